"""Results of any size with a real Celery worker, end to end: results of
1, 20 and 200 MB and a group of 100 x 1 MB round-trip exactly through
`AsyncResult.get()` (uploaded to S3 through presigned URLs, read back the
same way), and a chord of 200 parts x 100 KB calls back with every result
although they pass a queue message's limit (the callback carries a
reference; the package's worker hook puts the results back). Where Redis
has no limit either: `GroupResult.save()` of 50,000 tasks, and tasks called
with arguments of 2 MB under `result_extended` (through a Redis broker: an
SQS message holds at most 1 MiB), alone and as a chord's parts; and a
failure whose exception and traceback are 1.5 MB each.
"""

import hashlib
import json
import os
import random
import uuid

import pytest
from worker_process import celery_worker, redis_server, use_local_stack

RUN = uuid.uuid4().hex[:10]
use_local_stack(RUN)

from celery import Celery, chord, group  # noqa: E402
from celery.result import AsyncResult, GroupResult  # noqa: E402
from e2e_tasks import add, app, blob, digest, fail_loudly  # noqa: E402

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


def test_a_saved_group_of_fifty_thousand_tasks_restores_whole(worker):
    """About 2.7 MB as Celery's tuple: past a request's size, uploaded to S3
    by the package, read back whole by GroupResult.restore()."""
    ran = group(add.s(i, i) for i in range(10))()
    ids = [r.id for r in ran.results] + [str(uuid.uuid4()) for _ in range(49_990)]
    saved = GroupResult(str(uuid.uuid4()), [AsyncResult(i, app=app) for i in ids], app=app)
    saved.save()
    restored = GroupResult.restore(saved.id, app=app)
    assert restored is not None and [r.id for r in restored.results] == ids
    # The first ten ran on the worker: their results come through the restored group.
    assert [r.get(timeout=TIMEOUT) for r in restored.results[:10]] == [2 * i for i in range(10)]
    restored.delete()
    assert GroupResult.restore(saved.id, app=app) is None


def test_a_failure_with_a_traceback_of_megabytes_is_stored_and_raised_whole(worker):
    """An exception and a traceback of 1.5 MB each: the package uploads the
    traceback with the result (the exception), as one object; get() raises
    the whole exception and AsyncResult.traceback reads back whole."""
    size = 1_500_000
    result = fail_loudly.delay(size, 7)
    with pytest.raises(ValueError) as err:
        result.get(timeout=TIMEOUT)
    message = expected_blob(size, 7)
    assert err.value.args[0] == message
    assert result.traceback is not None and message in result.traceback
    assert len(result.traceback) > size


@pytest.fixture(scope="module")
def redis_broker(request, worker):
    """An app and a worker of the e2e tasks on a Redis broker of this
    module's own, with the dynachord backend (the app's result_extended),
    on a queue of the same name as the SQS worker's: chord-join sends a
    chord's callback to that queue on SQS, where the SQS worker runs it."""
    with redis_server() as url:
        env = dict(os.environ, E2E_BROKER=url)
        client = Celery("e2e_tasks", set_as_current=False)
        client.conf.update(app.conf, broker_url=url)
        with celery_worker(request, f"large-redis-{RUN}", env):
            assert client.signature("e2e_tasks.add", (1, 1)).delay().get(timeout=120) == 2
            yield client


def test_a_task_called_with_a_2_mb_argument_keeps_its_arguments(redis_broker):
    argument = [expected_blob(2 * MB, random.randrange(1 << 30))]
    result = redis_broker.signature("e2e_tasks.digest", (argument,)).delay()
    want = {"count": 1, "sha256": hashlib.sha256(json.dumps(argument).encode()).hexdigest()}
    assert result.get(timeout=TIMEOUT) == want
    # result_extended: the arguments are stored with the result, and read back.
    fresh = AsyncResult(result.id, app=redis_broker)
    assert (fresh.name, fresh.args, fresh.kwargs) == ("e2e_tasks.digest", [argument], {})


def test_a_chord_of_parts_called_with_2_mb_arguments_calls_back_with_their_results(redis_broker):
    arguments = [[expected_blob(2 * MB, random.randrange(1 << 30))] for _ in range(3)]
    s = redis_broker.signature
    result = chord(s("e2e_tasks.digest", (a,)) for a in arguments)(s("e2e_tasks.collect", ("big",)))
    digests = [{"count": 1, "sha256": hashlib.sha256(json.dumps(a).encode()).hexdigest()} for a in arguments]
    assert result.get(timeout=TIMEOUT) == {"tag": "big", "values": digests}
    for part, argument in zip(result.parent.results, arguments, strict=True):
        assert AsyncResult(part.id, app=redis_broker).args == [argument]
