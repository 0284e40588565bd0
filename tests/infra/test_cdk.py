"""The CDK app (infra/cdk) deploys the stack infra/template.yaml deploys.

The SAM template is translated to CloudFormation by SAM's own translator
(samtranslator, offline), the CDK app is synthesized by `cdk synth`
(offline), and the two templates are compared resource by resource: the same
parameters, conditions, rule and outputs, and for every resource the same
type and properties. That covers the table's keys, TTL and stream, the
functions' environment, memory and timeouts, every IAM statement and managed
policy, and the API's routes. What may differ: logical ids (CDK's carry a
hash; each resource is matched by its construct path, named as in the SAM
template), the functions' code (an S3 object either way) and SAM's
`lambda:createdBy` tags.

Run by `./dev check-infra` (and `./dev test`), with .venv-infra's Python.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
from typing import Any

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CDK = ROOT / "infra" / "cdk"
FUNCTIONS = ["store", "fetch", "batch-fetch", "chord-join"]


def load_sam() -> dict[str, Any]:
    """The SAM template with its short-form tags in long form, as CloudFormation reads it."""

    class Loader(yaml.SafeLoader):
        pass

    def tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
        name = suffix if suffix in ("Ref", "Condition") else f"Fn::{suffix}"
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            if suffix == "GetAtt":
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
        return {name: value}

    Loader.add_multi_constructor("!", tag)
    return yaml.load((ROOT / "infra" / "template.yaml").read_text(), Loader=Loader)


def translate_sam(parameters: dict[str, str] | None = None) -> dict[str, Any]:
    """SAM's transform, as CloudFormation runs it (the code as a packaged S3
    object), with the parameters' defaults but for `parameters`: SAM decides
    some properties from them (Tracing: Disabled sets no tracing mode and
    grants no X-Ray access)."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from samtranslator.translator.transform import transform

    template = load_sam()
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = "s3://bucket/key"

    class NoManagedPolicies:  # the template names none by name
        def load(self) -> dict[str, str]:
            return {}

    return transform(template, parameters or {}, NoManagedPolicies())


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("cdk")
    # Synthesis needs each function's asset directory to exist; what is in it
    # only decides the asset's hash, which this comparison does not look at.
    assets = tmp / "assets"
    for name in FUNCTIONS:
        (assets / name).mkdir(parents=True)
        (assets / name / "bootstrap").write_text("synth only\n")
    out = tmp / "cdk.out"
    # Offline: no version check, no notices, no telemetry.
    env = {**os.environ, "CDK_DISABLE_VERSION_CHECK": "1", "CDK_DISABLE_CLI_TELEMETRY": "true", "CI": "true"}
    subprocess.run(["npx", "--no-install", "tsc"], cwd=CDK, check=True, env=env)
    subprocess.run(
        [
            "npx",
            "--no-install",
            "cdk",
            "synth",
            "--quiet",
            "--no-notices",
            "--strict",
            "-c",
            f"assetsDir={assets}",
            "-o",
            str(out),
        ],
        cwd=CDK,
        check=True,
        env=env,
    )
    cdk = json.loads((out / "dynachord.template.json").read_text())
    return translate_sam(), cdk


# Conditions SAM decides when it translates (from the parameters it was
# given), where CloudFormation decides the CDK app's: their `Fn::If`s are
# resolved before the two compare. With the defaults, tracing is off.
TRACING_OFF = {"IsTracingOn": False}
NO_VALUE = "${AWS::NoValue}"


class Renderer:
    """Writes a template's values with logical ids replaced by SAM's names,
    so that two templates compare as data; `known` conditions (by SAM name)
    resolve their `Fn::If`s, and what they leave as `AWS::NoValue` is dropped."""

    def __init__(self, names: dict[str, str], conditions: dict[str, str], known: dict[str, bool] | None = None):
        self.names = names
        self.conditions = conditions
        self.known = known or {}

    def name(self, logical_id: str) -> str:
        return self.names.get(logical_id, logical_id)

    def sub(self, text: str, variables: dict[str, Any] | None = None) -> str:
        def one(match: re.Match[str]) -> str:
            ref = match.group(1)
            if variables and ref in variables:
                value = self.render(variables[ref])
                return value if isinstance(value, str) else json.dumps(value)
            head, _, attribute = ref.partition(".")
            return "${" + self.name(head) + ("." + attribute if attribute else "") + "}"

        return re.sub(r"\$\{([^}!]+)\}", one, text)

    def render(self, value: Any) -> Any:
        if isinstance(value, list):
            return [r for r in (self.render(v) for v in value) if r != NO_VALUE]
        if isinstance(value, str):
            # SAM writes the managed policies' ARNs for the partition it translated in.
            return value.replace("${AWS::Partition}", "aws")
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self.render("${" + self.name(arg) + "}")
            if key == "Fn::GetAtt":
                head, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
                return "${" + self.name(head) + "." + attribute + "}"
            if key == "Fn::Sub":
                text, variables = (arg, None) if isinstance(arg, str) else (arg[0], arg[1])
                return self.render(self.sub(text, variables))
            if key == "Fn::Join":
                if not isinstance(arg[1], list):  # a list parameter: {"Ref": ...}
                    return {"Join": [arg[0], self.render(arg[1])]}
                parts = [self.render(p) for p in arg[1]]
                if all(isinstance(p, str) for p in parts):
                    return self.render(arg[0].join(parts))
                return {"Join": [arg[0], parts]}
            if key == "Fn::If":
                condition = self.conditions.get(arg[0], arg[0])
                if condition in self.known:
                    return self.render(arg[1] if self.known[condition] else arg[2])
                return {"If": [condition, self.render(arg[1]), self.render(arg[2])]}
            if key == "Condition":
                return {"Condition": self.conditions.get(arg, arg)}
        rendered = {k: self.render(v) for k, v in value.items()}
        return {k: v for k, v in rendered.items() if v != NO_VALUE}


def cdk_names(cdk: dict[str, Any]) -> dict[str, str]:
    """CDK logical id -> SAM name: the construct's id under Dynachord."""
    names = {}
    for logical_id, resource in cdk["Resources"].items():
        parts = resource["Metadata"]["aws:cdk:path"].split("/")
        names[logical_id] = parts[parts.index("Dynachord") + 1]
    return names


def renderers(
    sam: dict[str, Any], cdk: dict[str, Any], known: dict[str, bool] = TRACING_OFF
) -> tuple[Renderer, Renderer]:
    names = cdk_names(cdk)
    sam_r = Renderer({}, {})
    plain = Renderer(names, {})
    # Conditions are matched by what they test (CDK's names carry a hash).
    by_expression = {json.dumps(sam_r.render(e), sort_keys=True): n for n, e in sam["Conditions"].items()}
    conditions: dict[str, str] = {}
    for _ in range(3):  # conditions naming conditions resolve in rounds
        plain.conditions = conditions
        for name, expression in cdk["Conditions"].items():
            key = json.dumps(plain.render(expression), sort_keys=True)
            if key in by_expression:
                conditions[name] = by_expression[key]
    return sam_r, Renderer(names, conditions, known)


def test_the_parameters_are_the_sam_templates(templates):
    sam, cdk = templates
    # BootstrapVersion (and the rule CheckBootstrapVersion) are CDK's own: the
    # version of the bucket `cdk bootstrap` made for the functions' code.
    cdk_parameters = {k: v for k, v in cdk["Parameters"].items() if k != "BootstrapVersion"}
    assert list(cdk_parameters) == list(sam["Parameters"])
    for name, spec in sam["Parameters"].items():
        mine = cdk_parameters[name]
        for key in ("Type", "AllowedValues", "AllowedPattern", "MinValue", "MaxValue"):
            assert mine.get(key) == spec.get(key), f"{name}.{key}"
        assert str(mine["Default"]) == str(spec["Default"]), f"{name}.Default"
        assert mine["Description"] == spec["Description"].strip(), f"{name}.Description"
    groups = sam["Metadata"]["AWS::CloudFormation::Interface"]
    assert cdk["Metadata"]["AWS::CloudFormation::Interface"] == groups


def test_the_conditions_rule_and_outputs_are_the_sam_templates(templates):
    sam, cdk = templates
    sam_r, cdk_r = renderers(sam, cdk)
    assert sorted(cdk_r.conditions.values()) == sorted(sam["Conditions"]), "every condition, once"
    assert len(cdk["Conditions"]) == len(sam["Conditions"])
    rules = {k: v for k, v in cdk["Rules"].items() if k != "CheckBootstrapVersion"}
    assert cdk_r.render(rules) == sam_r.render(sam["Rules"])
    outputs = {
        name: {**output, **({"Condition": cdk_r.conditions[output["Condition"]]} if "Condition" in output else {})}
        for name, output in cdk["Outputs"].items()
    }
    assert cdk_r.render(outputs) == sam_r.render(sam["Outputs"])


# What SAM's transform adds that CDK has no reason to: the code's location
# and SAM's own tag.
IGNORED = {"AWS::Lambda::Function": {"Code", "Tags"}, "AWS::IAM::Role": {"Tags"}}


def test_every_resource_is_the_sam_templates(templates):
    sam, cdk = templates
    same_resources(sam, cdk, TRACING_OFF)


def test_with_tracing_on_every_resource_is_the_sam_templates(templates):
    """SAM decides tracing when it translates: with Tracing Active it sets the
    mode and grants X-Ray write access; the CDK app's conditions do the same."""
    _, cdk = templates
    sam = translate_sam({"Tracing": "Active"})
    same_resources(sam, cdk, {"IsTracingOn": True})
    roles = [r for r in sam["Resources"].values() if r["Type"] == "AWS::IAM::Role"]
    assert roles and all(any("Xray" in json.dumps(a) for a in r["Properties"]["ManagedPolicyArns"]) for r in roles)


def test_with_tracing_disabled_no_function_may_write_to_x_ray(templates):
    sam, cdk = templates
    _, cdk_r = renderers(sam, cdk)
    rendered = json.dumps(cdk_r.render(cdk["Resources"]))
    assert "Xray" not in rendered and "TracingConfig" not in rendered
    assert "Xray" not in json.dumps(sam["Resources"])


def same_resources(sam: dict[str, Any], cdk: dict[str, Any], known: dict[str, bool]) -> None:
    sam_r, cdk_r = renderers(sam, cdk, known)
    mine = {cdk_r.names[k]: v for k, v in cdk["Resources"].items()}
    assert sorted(mine) == sorted(sam["Resources"])
    for name, theirs in sam["Resources"].items():
        ours = mine[name]
        assert ours["Type"] == theirs["Type"], name
        skip = IGNORED.get(theirs["Type"], set())
        want = {k: v for k, v in theirs.get("Properties", {}).items() if k not in skip}
        got = {k: v for k, v in ours.get("Properties", {}).items() if k not in skip}
        assert cdk_r.render(got) == sam_r.render(want), name
        for attribute in ("Condition", "DeletionPolicy", "UpdateReplacePolicy"):
            have = ours.get(attribute)
            assert (cdk_r.conditions.get(have, have) if attribute == "Condition" else have) == theirs.get(attribute), (
                f"{name}.{attribute}"
            )


def test_the_functions_routes_and_permissions_are_spelled_out(templates):
    """The comparison above is only as good as its inputs: the points the
    operator cares about most, checked by name."""
    sam, cdk = templates
    _, cdk_r = renderers(sam, cdk)
    mine = {cdk_r.names[k]: v for k, v in cdk["Resources"].items()}
    table = mine["ResultsTable"]["Properties"]
    assert table["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert table["StreamSpecification"] == {"StreamViewType": "NEW_AND_OLD_IMAGES"}
    memory = {n: mine[n]["Properties"]["MemorySize"] for n in mine if mine[n]["Type"] == "AWS::Lambda::Function"}
    assert memory == {"StoreFunction": 512, "FetchFunction": 256, "BatchFetchFunction": 512, "ChordJoinFunction": 1024}
    routes = sorted(
        (cdk_r.render(r["Properties"]["RouteKey"]), cdk_r.render(r["Properties"]["Target"]))
        for r in mine.values()
        if r["Type"] == "AWS::ApiGatewayV2::Route"
    )
    assert ("PUT /v1/tasks/{task_id}", "integrations/${StoreIntegration}") in routes
    assert ("POST /v1/tasks/batch-get", "integrations/${BatchFetchIntegration}") in routes
    assert ("POST /v1/groups/{group_id}/upload", "integrations/${StoreIntegration}") in routes
    assert len(routes) == 14
    join = cdk_r.render(mine["ChordJoinFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"])
    assert {
        "Effect": "Allow",
        "Action": ["sqs:SendMessage"],
        "Resource": {"If": ["HasQueueArns", "${CallbackQueueArns}", "arn:aws:sqs:${AWS::Region}:${AWS::AccountId}:*"]},
    } in join


def test_the_function_url_front_door_is_iam_authorized_and_replaces_the_api(templates):
    """FrontDoor FunctionUrls: each HTTP function's own URL, IAM-authorized,
    instead of the HTTP API (every API resource is conditional on UseHttpApi),
    and a rule refuses it without AuthMode iam."""
    sam, cdk = templates
    _, cdk_r = renderers(sam, cdk)
    mine = {cdk_r.names[k]: v for k, v in cdk["Resources"].items()}
    urls = {n: r for n, r in mine.items() if r["Type"] == "AWS::Lambda::Url"}
    assert sorted(urls) == ["BatchFetchFunctionUrl", "FetchFunctionUrl", "StoreFunctionUrl"]
    for resource in urls.values():
        assert resource["Properties"]["AuthType"] == "AWS_IAM"
        assert cdk_r.conditions[resource["Condition"]] == "UseFunctionUrls"
    api = [n for n, r in mine.items() if r["Type"].startswith("AWS::ApiGatewayV2::") or n.endswith("ApiPermission")]
    assert len(api) >= 13 + 3 + 3 + 2
    assert all(cdk_r.conditions[mine[n]["Condition"]] == "UseHttpApi" for n in api)
    rule = sam["Rules"]["FunctionUrlsAreIamAuthorized"]
    assert rule["Assertions"][0]["Assert"] == {"Fn::Equals": [{"Ref": "AuthMode"}, "iam"]}
    backend = cdk_r.render(cdk["Outputs"]["ResultBackend"]["Value"])
    assert backend["If"][0] == "UseHttpApi"
    assert backend["If"][2] == (
        "dynachord+${StoreFunctionUrl.FunctionUrl}?fetch=${FetchFunctionUrl.FunctionUrl}"
        "&batch_get=${BatchFetchFunctionUrl.FunctionUrl}"
    )
