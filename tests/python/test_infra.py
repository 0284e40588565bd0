"""The table the local stack creates is the table infra/template.yaml deploys.

One source of truth for keys, attribute types, TTL attribute and stream view:
shared/src/store/schema.rs creates the local table; this compares it, as
DynamoDB Local describes it, with the template's table resource.
"""

import os
import pathlib

import boto3
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_template():
    class CfnLoader(yaml.SafeLoader):
        pass

    def tag(loader, suffix, node):  # !Ref, !GetAtt, !If ... kept as data
        if isinstance(node, yaml.ScalarNode):
            return {suffix: loader.construct_scalar(node)}
        if isinstance(node, yaml.SequenceNode):
            return {suffix: loader.construct_sequence(node, deep=True)}
        return {suffix: loader.construct_mapping(node, deep=True)}

    CfnLoader.add_multi_constructor("!", tag)
    return yaml.load((ROOT / "infra" / "template.yaml").read_text(), Loader=CfnLoader)


def test_local_table_matches_the_templates_table():
    table = load_template()["Resources"]["ResultsTable"]["Properties"]
    client = boto3.client(
        "dynamodb",
        endpoint_url=os.environ.get("DYNAMODB_ENDPOINT", "http://127.0.0.1:8000"),
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    name = os.environ.get("TABLE_NAME", "dynachord-local")
    local = client.describe_table(TableName=name)["Table"]

    def keys(schema):
        return sorted((k["AttributeName"], k["KeyType"]) for k in schema)

    def attributes(defs):
        return sorted((a["AttributeName"], a["AttributeType"]) for a in defs)

    assert keys(local["KeySchema"]) == keys(table["KeySchema"])
    assert attributes(local["AttributeDefinitions"]) == attributes(table["AttributeDefinitions"])
    assert local["StreamSpecification"]["StreamEnabled"]
    assert local["StreamSpecification"]["StreamViewType"] == table["StreamSpecification"]["StreamViewType"]
    ttl = client.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == table["TimeToLiveSpecification"]["AttributeName"]
    assert ttl["TimeToLiveStatus"] in ("ENABLED", "ENABLING")
    assert table["TimeToLiveSpecification"]["Enabled"] is True


def test_every_v1_route_is_in_the_template_and_the_local_router():
    resources = load_template()["Resources"]
    routes = sorted(
        tuple(resource["Properties"]["RouteKey"].split(" ", 1))
        for resource in resources.values()
        if resource["Type"] == "AWS::ApiGatewayV2::Route"
    )
    assert routes == sorted(
        [
            ("PUT", "/v1/tasks/{task_id}"),
            ("POST", "/v1/tasks/{task_id}/upload"),
            ("GET", "/v1/tasks/{task_id}"),
            ("DELETE", "/v1/tasks/{task_id}"),
            ("POST", "/v1/tasks/batch-get"),
            ("PUT", "/v1/groups/{group_id}"),
            ("POST", "/v1/groups/{group_id}/upload"),
            ("GET", "/v1/groups/{group_id}"),
            ("DELETE", "/v1/groups/{group_id}"),
            ("GET", "/v1/chords/{group_id}"),
            ("POST", "/v1/chords/{group_id}/redrive"),
            ("POST", "/v1/cache/get-or-delegate"),
            ("POST", "/v1/cache/entry"),
            ("POST", "/v1/cache/invalidate"),
        ]
    )
    cargo = (ROOT / "Cargo.toml").read_text()
    for _, path in routes:
        assert f'"{path}"' in cargo, f"{path} missing from cargo lambda watch's router"


def test_the_buckets_lifecycle_rules_match_the_lifetime_classes_objects_are_tagged_with():
    """shared/src/store/blobs.rs tags each object with the smallest class
    that outlives its item; the template needs a rule for every class."""
    blobs = (ROOT / "shared" / "src" / "store" / "blobs.rs").read_text()
    classes = blobs.split("EXPIRY_CLASSES_DAYS: [u64; ")[1].split("=")[1].split(";")[0]
    days = [int(d) for d in classes.strip(" []").split(",")]
    bucket = load_template()["Resources"]["ResultsBucket"]["Properties"]
    rules = {
        (f["Key"], f["Value"]): r["ExpirationInDays"]
        for r in bucket["LifecycleConfiguration"]["Rules"]
        for f in r.get("TagFilters", [])
    }
    assert rules == {("dynachord-expiry", f"{d}d"): d for d in days}
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert "ServerSideEncryptionConfiguration" in bucket["BucketEncryption"]
    policy = load_template()["Resources"]["ResultsBucketPolicy"]["Properties"]["PolicyDocument"]
    assert any(
        st["Effect"] == "Deny" and st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        for st in policy["Statement"]
    )


def test_the_dashboard_and_alarms_use_only_metrics_the_functions_write():
    """Every dynachord metric the template charts or alarms on is one that
    shared/src/metrics.rs defines (a renamed metric would leave a silent
    alarm), and the dashboard's body is JSON."""
    import json
    import re

    source = (ROOT / "shared" / "src" / "metrics.rs").read_text()
    defined = set(re.findall(r'pub const [A-Z_0-9]+: &str = "([A-Za-z0-9]+)";', source)) - {"dynachord"}
    resources = load_template()["Resources"]
    used = set()
    for resource in resources.values():
        if resource["Type"] != "AWS::CloudWatch::Alarm":
            continue
        props = resource["Properties"]
        if props.get("Namespace") == "dynachord":
            used.add(props["MetricName"])
        for metric in props.get("Metrics", []):
            stat = metric.get("MetricStat", {}).get("Metric", {})
            if stat.get("Namespace") == "dynachord":
                used.add(stat["MetricName"])
    body = resources["Dashboard"]["Properties"]["DashboardBody"]["Sub"][0]
    widgets = json.loads(body.replace("${AWS::Region}", "us-east-1").replace("${ChordJoin}", "f"))["widgets"]
    for widget in widgets:
        current = None
        for row in widget["properties"]["metrics"]:
            # A row is [namespace, name, dimension, value...]; "." repeats the row above's.
            names = [x for x in row if isinstance(x, str)]
            if names and names[0] in ("dynachord", "."):
                current = names[1] if names[1] != "." else current
                used.add(current)
            for item in row:
                if isinstance(item, dict) and "expression" in item:
                    used.update(re.findall(r'MetricName=\\?"([A-Za-z0-9]+)', item["expression"]))
    assert used, "the template charts dynachord's metrics"
    assert used <= defined, f"not written by the functions: {sorted(used - defined)}"
    assert {"ChordJoinLatency", "ChordPartsCounted", "Throttled", "Hits", "LongPollWait", "BatchSize"} <= used


def test_only_api_gateway_may_invoke_the_functions_and_chord_join_has_its_own_slots():
    """The functions trust the authorizer context in their event, so the
    template grants invocation to this API alone (the stream's event source
    mapping needs no permission); chord-join keeps reserved concurrency
    (a parameter, none at 0) and may delete the objects it replaces."""
    resources = load_template()["Resources"]
    permissions = {k: r["Properties"] for k, r in resources.items() if r["Type"] == "AWS::Lambda::Permission"}
    for name, p in permissions.items():
        assert p["Principal"] == "apigateway.amazonaws.com", name
        assert p["Action"] == "lambda:InvokeFunction", name
        assert "${HttpApi}/" in p["SourceArn"]["Sub"], name
    invoked = {p["FunctionName"]["Ref"] for p in permissions.values()}
    assert invoked == {"StoreFunction", "FetchFunction", "BatchFetchFunction"}
    join = resources["ChordJoinFunction"]["Properties"]
    assert join["ReservedConcurrentExecutions"] == {
        "If": ["HasChordJoinReservation", {"Ref": "ChordJoinReservedConcurrency"}, {"Ref": "AWS::NoValue"}]
    }
    # Statements written under a condition (!If) are left out.
    actions = [a for st in join["Policies"][0]["Statement"] for a in st.get("Action", [])]
    assert "s3:DeleteObject" in actions
