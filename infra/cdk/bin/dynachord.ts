#!/usr/bin/env node
// The CDK app: one stack, named by the context value `stackName` (default
// dynachord), with the SAM template's parameters. The functions' code comes
// from `assetsDir` (default: the workspace's target/lambda, where
// `cargo lambda build --release` writes it). docs/CDK.md has the steps.

import { App } from "aws-cdk-lib";
import { DynachordStack } from "../lib/stack";

const app = new App();
new DynachordStack(app, app.node.tryGetContext("stackName") ?? "dynachord", {
  assetsDir: app.node.tryGetContext("assetsDir"),
});
