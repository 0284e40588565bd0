"""openapi.yaml kept honest against the running local stack, and fuzzed.

schemathesis (PyPI) generates requests from the spec and checks every
response against it: no 5xx for any input, documented statuses, content
types, headers and bodies. Bounded in examples per operation and in time.
Sentinel results stored before the fuzzing must read back byte for byte the
same after it, including a SUCCESS that a run aims every store at.
"""

import tomllib
import yaml
from contract_support import ROOT, SPEC, call, schemathesis


def test_the_spec_is_valid_openapi_3_1():
    from openapi_spec_validator import validate
    from openapi_spec_validator.readers import read_from_filename

    spec, _ = read_from_filename(str(SPEC))
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_the_spec_and_the_router_have_the_same_routes():
    router = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["metadata"]["lambda"]["watch"]["router"]
    served = {(m["method"].lower(), path) for path, methods in router.items() for m in methods}

    spec = yaml.safe_load(SPEC.read_text())
    documented = {(method, path) for path, item in spec["paths"].items() for method in item if method != "parameters"}
    assert documented == served


def test_fuzzing_every_route_finds_no_server_error_and_no_undocumented_response(tmp_path, sentinels):
    out = schemathesis(tmp_path, "--mode", "all", "--phases", "examples,coverage,fuzzing")
    assert "No issues found" in out or "passed" in out.lower()
    for path, before in sentinels.items():
        assert call("GET", path)[1] == before, f"{path} changed under fuzzing"
