"""Fixtures shared by more than one test module."""

import uuid

import pytest
from contract_support import call


@pytest.fixture(scope="module")
def sentinels():
    """Results in every state, and a saved group, stored before fuzzing."""
    run = uuid.uuid4().hex[:10]
    stored = {}
    for status, result in [
        ("SUCCESS", {"n": 12345678901234567890, "s": "é✓"}),
        ("FAILURE", {"exc_type": "ValueError", "exc_message": ["x"], "exc_module": "builtins"}),
        ("REVOKED", None),
        ("STARTED", {"pid": 1}),
        ("PROGRESS", {"done": 1}),
    ]:
        path = f"/v1/tasks/sentinel-{run}-{status.lower()}"
        assert call("PUT", path, {"status": status, "result": result})[0] == 200
        stored[path] = call("GET", path)[1]
    group = f"/v1/groups/sentinel-{run}-group"
    assert call("PUT", group, {"result": [["g", None], [[["t1", None], None]]]})[0] == 200
    stored[group] = call("GET", group)[1]
    return stored
