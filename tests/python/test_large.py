"""Results of any size with a real Celery worker, end to end: results of
1, 20 and 200 MB and a group of 100 x 1 MB round-trip exactly through
`AsyncResult.get()` (uploaded to S3 through presigned URLs, read back the
same way), and a chord of 200 parts x 100 KB calls back with every result
although they pass a queue message's limit (the callback carries a
reference; the package's worker hook puts the results back).
"""

import hashlib
import json
import os
import random
import uuid

import pytest
from worker_process import celery_worker, use_local_stack

RUN = uuid.uuid4().hex[:10]
use_local_stack(RUN)

from celery import chord, group  # noqa: E402
from e2e_tasks import add, app, blob, digest  # noqa: E402

TIMEOUT = 300
MB = 1_000_000


def expected_blob(size, seed):
    return random.Random(seed).randbytes(size // 2 + 1).hex()[:size]


@pytest.fixture(scope="module")
def worker(request):
    with celery_worker(request, f"large-{RUN}", dict(os.environ)) as w:
        assert add.delay(1, 1).get(timeout=120) == 2
        yield w


@pytest.mark.parametrize("megabytes", [1, 20, 200])
def test_a_large_result_round_trips_exactly(worker, megabytes):
    seed = random.randrange(1 << 30)
    result = blob.delay(megabytes * MB, seed)
    assert result.get(timeout=TIMEOUT) == expected_blob(megabytes * MB, seed)
    # Past the request limit, the worker uploaded it; the service answers a
    # plain GET with a presigned URL past INLINE_RESULT_BYTES (4 MB), else
    # with the result read back from S3.
    raw = app.backend.client.request("GET", f"/v1/tasks/{result.id}").json()
    if megabytes * MB > 4_000_000:
        assert raw["result"] is None and raw["result_ref"]["bytes"] == megabytes * MB + 2
    else:
        assert raw["result"] == expected_blob(megabytes * MB, seed) and "result_ref" not in raw


def test_a_group_of_100_results_of_1_mb_round_trips_exactly(worker):
    seeds = [random.randrange(1 << 30) for _ in range(100)]
    got = group(blob.s(MB, seed) for seed in seeds)().get(timeout=TIMEOUT)
    assert got == [expected_blob(MB, seed) for seed in seeds]


def test_a_chord_of_200_parts_of_100_kb_calls_back_with_all_of_its_results(worker):
    seeds = [random.randrange(1 << 30) for _ in range(200)]
    result = chord(blob.s(100_000, seed) for seed in seeds)(digest.s())
    values = [expected_blob(100_000, seed) for seed in seeds]
    assert result.get(timeout=TIMEOUT) == {
        "count": 200,
        "sha256": hashlib.sha256(json.dumps(values).encode()).hexdigest(),
    }
    # 20 MB of results: the callback carried a reference, and its own
    # stored meta (result_extended) keeps the reference, not the results.
    meta = app.backend.client.get_task(result.id)
    assert list(meta["args"][0]) == ["dynachord_ref"], str(meta["args"])[:300]
    assert meta["args"][0]["dynachord_ref"]["bytes"] > 20 * MB
