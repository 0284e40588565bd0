"""The processing cache with a real Celery worker, end to end, written the
way Backache's users write it (`dynachord_celery.cache`, operations in
tests/python/e2e/e2e_tasks.py):

- 50 concurrent clients miss the same key: one processing, one callback
  with the 50 `cb_args`; a later request is a hit and runs no task;
- a bulk request of 500 keys, half of them cached: 250 hits answered (and
  given to `hits_callback`), 250 processings, each calling back once;
- an operation that retries itself through Celery's retry keeps its entry;
- a failing operation sends one quarantine message, and the next request
  delegates again; an operation that quarantines itself gives its kwargs.

The local stack's two pumps deliver every stream record four times, so
"once" is checked against redelivery: the worker's log shows each callback
task ran once.
"""

import os
import re
import threading
import time
import uuid

import pytest
from worker_process import celery_worker, use_local_stack

RUN = uuid.uuid4().hex[:10]
use_local_stack(RUN)

from celery.result import AsyncResult  # noqa: E402
from dynachord_celery.cache import CALLBACK_PREFIX, OPERATION_PREFIX, QUARANTINE_TASK  # noqa: E402
from e2e_tasks import add, app, cache  # noqa: E402

TIMEOUT = 120
# How long a queue's worker is watched for a second run after the first:
# a redelivered record is sent within a pump's next batch, well inside it.
WATCH = 4.0


@pytest.fixture(scope="module")
def worker(request):
    with celery_worker(request, f"cache-{RUN}", dict(os.environ), concurrency=4) as w:
        assert add.delay(1, 1).get(timeout=TIMEOUT) == 2
        yield w


def runs(worker, task_name, task_id):
    """How many times the worker finished task `task_name` with id `task_id`."""
    pattern = re.compile(rf"Task {re.escape(task_name)}\[{re.escape(task_id)}\] (succeeded|raised|retry)")
    return len(pattern.findall(worker.text()))


def poll_until(what, deadline_s, check):
    deadline = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.1)


def ran(worker, task_name, task_id, count):
    """Waits until the worker's log shows task `task_id` finished `count`
    times, and checks it did not finish more often. Celery stores a task's
    result before it logs the task's end, so a result already fetched does
    not mean the line is written yet."""
    poll_until(
        f"{task_name}[{task_id}] to have finished {count} times",
        TIMEOUT,
        lambda: runs(worker, task_name, task_id) >= count,
    )
    assert runs(worker, task_name, task_id) == count, worker.text()[-3000:]


def watch_stays(worker, task_name, task_id, count):
    """Waits until task `task_id` finished `count` times, then watches the
    worker for WATCH seconds: it ran no more."""
    ran(worker, task_name, task_id, count)
    end = time.monotonic() + WATCH
    while time.monotonic() < end:
        assert runs(worker, task_name, task_id) == count, worker.text()[-3000:]
        time.sleep(0.2)


def uri(tag):
    return f"s3://e2e-{RUN}/{tag}-{uuid.uuid4().hex[:8]}"


def test_fifty_concurrent_misses_make_one_processing_and_one_callback_then_hits(worker):
    key = uri("slow")  # the operation sleeps on it, so every request overlaps it
    outcomes = [None] * 50
    start = threading.Barrier(50)

    def ask(i):
        start.wait()
        outcomes[i] = cache.get_or_delegate("measure", key, cb_args={"client": i})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o is not None and o.state == "processing" for o in outcomes), outcomes
    delegated = [o for o in outcomes if o.delegated]
    assert len(delegated) == 1, "one conditional write decides who delegates"
    task_id = delegated[0].task_id
    assert {o.task_id for o in outcomes} == {task_id}
    assert sorted(o.waiters for o in outcomes) == list(range(1, 51)), "each request appended once"

    callback = AsyncResult(delegated[0].callback_id, app=app)
    got = callback.get(timeout=TIMEOUT)
    assert got["result"] == {"uri": key, "length": len(key)}
    assert sorted(c["client"] for c in got["cb_args"]) == list(range(50))
    ran(worker, OPERATION_PREFIX + "measure", task_id, 1)
    watch_stays(worker, CALLBACK_PREFIX + "measure", callback.id, 1)

    # A hit answers at once with the result, and runs no task.
    hit = cache.get_or_delegate("measure", key, cb_args={"client": 99})
    assert (hit.hit, hit.state, hit.result, hit.task_id) == (True, "cached", {"uri": key, "length": len(key)}, task_id)
    assert cache.state("measure", key)["state"] == "cached"
    watch_stays(worker, OPERATION_PREFIX + "measure", task_id, 1)
    watch_stays(worker, CALLBACK_PREFIX + "measure", callback.id, 1)


def test_a_bulk_request_of_500_keys_half_cached(worker):
    uris = [uri(f"bulk{i}") for i in range(500)]
    first = cache.bulk_get_or_delegate({"measure": uris[:250]}, cb_args="first")
    # All misses: the answer (about 60 KB) arrives whole the first time.
    assert not first.hits and {u for _, u in first.processing} == set(uris[:250])
    callbacks = {key: o.callback_id for key, o in first.processing.items()}
    for callback_id in callbacks.values():
        assert AsyncResult(callback_id, app=app).get(timeout=TIMEOUT)["cb_args"] == ["first"]
    for u in uris[:250]:
        poll_until(f"{u} cached", TIMEOUT, lambda u=u: cache.state("measure", u)["state"] == "cached")

    seen = {}
    second = cache.bulk_get_or_delegate({"measure": uris}, cb_args="second", hits_callback=seen.update)
    hits, processing = {u for _, u in second.hits}, {u for _, u in second.processing}
    assert hits >= set(uris[:250]) and processing <= set(uris[250:]), "the cached half is hits"
    assert hits | processing == set(uris) and not hits & processing
    assert all(o.delegated for o in second.processing.values())
    assert seen == second.hits
    for (op, u), hit in second.hits.items():
        assert (op, hit) == ("measure", {"cb_args": "second", "result": {"uri": u, "length": len(u)}})
    for (_, u), o in second.processing.items():
        got = AsyncResult(o.callback_id, app=app).get(timeout=TIMEOUT)
        assert got == {"result": {"uri": u, "length": len(u)}, "cb_args": ["second"]}
    # Each of the first 250 processings ran once and called back once.
    for callback_id in callbacks.values():
        ran(worker, CALLBACK_PREFIX + "measure", callback_id, 1)


def test_a_retry_through_celery_keeps_the_entry(worker):
    key = uri("flaky")
    first = cache.get_or_delegate("flaky", key, cb_args="a")
    got = AsyncResult(first.callback_id, app=app).get(timeout=TIMEOUT)
    assert got == {"result": {"uri": key, "attempt": 2}, "cb_args": ["a"]}
    state = cache.state("flaky", key)
    assert (state["state"], state["task_id"]) == ("cached", first.task_id), "the retry kept the same entry"
    ran(worker, OPERATION_PREFIX + "flaky", first.task_id, 2)  # one retry, then success


def test_a_failing_operation_sends_one_quarantine_message_and_the_next_request_delegates_again(worker):
    key = uri("broken")
    first = cache.get_or_delegate("broken", key, cb_args="w1")
    assert first.delegated
    quarantine_id = f"{first.task_id}-quarantine"
    got = AsyncResult(quarantine_id, app=app).get(timeout=TIMEOUT)
    assert got == {
        "operation": "broken",
        "uri": key,
        "exc_type": "ValueError",
        "exc": f"cannot process {key}",
        "op_kwargs": None,
    }
    poll_until("the entry open again", TIMEOUT, lambda: cache.state("broken", key)["state"] == "missing")
    watch_stays(worker, QUARANTINE_TASK, quarantine_id, 1)
    assert runs(worker, CALLBACK_PREFIX + "broken", f"{first.task_id}-callback") == 0

    again = cache.get_or_delegate("broken", key, cb_args="w2")
    assert again.delegated and again.task_id != first.task_id and again.waiters == 1
    AsyncResult(f"{again.task_id}-quarantine", app=app).get(timeout=TIMEOUT)


def test_an_operation_that_quarantines_itself_gives_its_kwargs(worker):
    key = uri("gone")
    first = cache.get_or_delegate("gives_up", key)
    got = AsyncResult(f"{first.task_id}-quarantine", app=app).get(timeout=TIMEOUT)
    assert got["exc_type"] == "ProcessingInQuarantineException"
    assert got["op_kwargs"] == {"reason": "not found", "uri": key}
