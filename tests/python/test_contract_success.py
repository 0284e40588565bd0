"""Fuzzed stores, every one aimed at a stored SUCCESS, never change it
(invariant S2). A module of its own so that it runs beside the other
fuzzing run (see contract_support.py)."""

from contract_support import call, schemathesis


def test_fuzzed_stores_aimed_at_a_success_never_change_it(tmp_path, sentinels):
    target = next(p for p in sentinels if p.endswith("-success"))
    task_id = target.rsplit("/", 1)[1]
    out = schemathesis(
        tmp_path,
        "--mode",
        "all",
        "--phases",
        "coverage,fuzzing",
        "--include-operation-id",
        "storeTask",
        config=f'[parameters]\n"path.task_id" = "{task_id}"\n',
        max_time="120",
        functions=["base"],
    )
    assert "1 selected" in out, "only the store operation is aimed at the sentinel"
    assert call("GET", target)[1] == sentinels[target]
