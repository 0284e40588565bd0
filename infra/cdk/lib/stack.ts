// The stack the app deploys: the SAM template's parameters, rule, outputs and
// console layout around one Dynachord construct.

import { CfnOutput, CfnParameter, CfnRule, Fn, Stack, StackProps, Validations } from "aws-cdk-lib";
import { Construct } from "constructs";
import { Dynachord, DynachordProps, DynachordSettings } from "./dynachord";
import { PARAMETERS, PARAMETER_GROUPS, ParameterName } from "./parameters";

export interface DynachordStackProps extends StackProps {
  /** Each function's code, or where `cargo lambda build` wrote it. */
  readonly code?: DynachordProps["code"];
  readonly assetsDir?: string;
}

export class DynachordStack extends Stack {
  readonly service: Dynachord;

  constructor(scope: Construct, id: string, props: DynachordStackProps = {}) {
    super(scope, id, {
      description:
        "dynachord: a serverless result service for task queues. An HTTP API (IAM auth) over four Rust Lambda functions and one DynamoDB table; chords are joined from the table's stream and their callbacks sent to SQS or Lambda.",
      ...props,
    });
    const settings: Partial<DynachordSettings> = {};
    const parameters: Partial<Record<ParameterName, CfnParameter>> = {};
    for (const [name, spec] of Object.entries(PARAMETERS) as [ParameterName, (typeof PARAMETERS)[ParameterName]][]) {
      const parameter = new CfnParameter(this, name, {
        type: spec.type,
        default: spec.default,
        description: spec.description,
        ...("allowedValues" in spec ? { allowedValues: spec.allowedValues } : {}),
        ...("allowedPattern" in spec ? { allowedPattern: spec.allowedPattern } : {}),
        ...("minValue" in spec ? { minValue: spec.minValue } : {}),
        ...("maxValue" in spec ? { maxValue: spec.maxValue } : {}),
      });
      parameters[name] = parameter;

      settings[name] =
        spec.type === "Number"
          ? parameter.valueAsNumber
          : spec.type === "CommaDelimitedList"
            ? parameter.valueAsList
            : parameter.valueAsString;
    }
    this.templateOptions.metadata = {
      "AWS::CloudFormation::Interface": {
        ParameterGroups: PARAMETER_GROUPS.map((g) => ({ Label: { default: g.label }, Parameters: g.parameters })),
      },
    };
    // A function URL is IAM-authorized or public: no open front door.
    new CfnRule(this, "FunctionUrlsAreIamAuthorized", {
      ruleCondition: Fn.conditionEquals(parameters.FrontDoor!.valueAsString, "FunctionUrls"),
      assertions: [
        {
          assert: Fn.conditionEquals(parameters.AuthMode!.valueAsString, "iam"),
          assertDescription: "FrontDoor FunctionUrls needs AuthMode iam (a function URL without IAM auth is public).",
        },
      ],
    });
    // A multi-tenant stack scopes sqs:SendMessage to the queues it grants.
    new CfnRule(this, "TenantsNameTheirQueues", {
      ruleCondition: Fn.conditionAnd(
        Fn.conditionNot(Fn.conditionEquals(parameters.Tenants!.valueAsString, "")),
        Fn.conditionEquals(parameters.CallbackTarget!.valueAsString, "sqs"),
      ),
      assertions: [
        {
          assert: Fn.conditionNot(Fn.conditionEachMemberEquals(parameters.CallbackQueueArns!.valueAsList, "")),
          assertDescription: "With Tenants set, list the granted queues' ARNs in CallbackQueueArns.",
        },
      ],
    });

    this.service = new Dynachord(this, "Dynachord", { settings, code: props.code, assetsDir: props.assetsDir });
    // The validator reports on the stack that the Tracing parameter allows
    // Disabled, which TracingConfig.Mode does not: it does not follow
    // IsTracingOn, under which a function's TracingConfig is NoValue then.
    Validations.of(this).acknowledge({
      id: "CloudFormation-Validate::W1030",
      reason: "TracingConfig is NoValue when Tracing is Disabled (IsTracingOn)",
    });
    // ResultBackend's Fn::If names the function URLs only in its
    // UseFunctionUrls branch, which the validator does not tell apart from
    // UseHttpApi's (FrontDoor has these two values alone).
    Validations.of(this).acknowledge({
      id: "CloudFormation-Validate::W1001",
      reason: "ResultBackend names the function URLs only when FrontDoor is FunctionUrls",
    });
    const s = this.service;
    // Outputs share CloudFormation's names with the parameters' (TableName is
    // both), so they live in a scope of their own under the SAM names.
    const outputs = new Construct(this, "Outputs");
    const output = (id: string, description: string, value: string) =>
      new CfnOutput(outputs, id, { description, value }).overrideLogicalId(id);
    output("DashboardUrl", "The stack's CloudWatch dashboard", s.dashboardUrl);
    new CfnOutput(outputs, "ApiUrl", {
      description: "Base URL of the v1 API (SigV4-signed requests, service execute-api)",
      value: s.apiUrl,
      condition: s.useHttpApi,
    }).overrideLogicalId("ApiUrl");
    output(
      "ResultBackend",
      "Celery's result_backend for this stack, as the Python package takes it (with function URLs it names each function's URL; SigV4, service lambda)",
      s.resultBackend,
    );
    output("TableName", "The results table", s.table.ref);
    output("StreamArn", "The table's stream, consumed by chord-join", s.table.attrStreamArn);
    output("DeadLetterQueueUrl", "Stream records chord-join gave up on", s.deadLetterQueue.ref);
    new CfnOutput(outputs, "TracingMode", {
      description: "The functions' X-Ray tracing mode (and their X-Ray write access)",
      value: settings.Tracing as string,
      condition: s.isTracingOn,
    }).overrideLogicalId("TracingMode");
  }
}
