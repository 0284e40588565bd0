"""Celery on dynachord, end to end: a real `celery worker` (Celery 5.7, SQS
broker on moto's server) with the dynachord result backend on the local
stack (./dev test starts it). Tasks, failures, groups, chains, chords joined
by the server and called back through SQS, saved groups, forget, expiry.
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

import e2e_tasks  # noqa: E402
from celery import Celery, chain, chord, group  # noqa: E402
from celery.exceptions import ChordError  # noqa: E402
from celery.result import AsyncResult, GroupResult  # noqa: E402
from dynachord_celery import (  # noqa: E402
    DynachordBackend,
    DynachordError,
    is_failure,
)
from e2e_tasks import add, app, collect, fail, fail_first, mul, record_error  # noqa: E402

TIMEOUT = 120


@pytest.fixture(scope="module")
def worker(request):
    """A real worker for the module; its log is shown if it did not start
    or a test failed."""
    with celery_worker(request, f"e2e-{RUN}", dict(os.environ)) as w:
        try:
            # The worker has declared its queue and runs tasks.
            assert add.delay(1, 1).get(timeout=TIMEOUT) == 2
        except Exception:
            print(w.text()[-5000:])
            raise
        yield w.log


def test_the_app_uses_dynachord():
    assert isinstance(app.backend, DynachordBackend)
    assert app.backend.url == os.environ["DYNACHORD_ENDPOINT"]


def test_a_task_and_its_extended_result(worker):
    result = add.delay(20, 22)
    assert result.get(timeout=TIMEOUT) == 42
    assert result.state == "SUCCESS"
    assert (result.name, result.args, result.kwargs, result.queue) == (
        "e2e_tasks.add",
        [20, 22],
        {},
        e2e_tasks.app.conf.task_default_queue,
    )
    assert result.date_done is not None


def test_a_failing_task_raises_its_exception(worker):
    result = fail.delay("boom")
    with pytest.raises(ValueError) as err:
        result.get(timeout=TIMEOUT)
    assert err.value.args == ("boom", 42)
    assert result.state == "FAILURE"
    assert "ValueError" in result.traceback


def test_a_group_is_fetched_with_batch_get(worker):
    result = group(add.s(i, i) for i in range(20))()
    assert result.supports_native_join
    assert result.get(timeout=TIMEOUT) == [2 * i for i in range(20)]


def test_a_chain(worker):
    assert chain(add.s(1, 2), add.s(3), mul.s(2))().get(timeout=TIMEOUT) == 12


@pytest.mark.parametrize("size", [3, 500])
def test_a_chord_is_joined_by_the_server_and_called_back_through_sqs(worker, size):
    tag = f"chord-{size}-{uuid.uuid4().hex[:6]}"
    result = chord(add.s(i, i) for i in range(size))(collect.s(tag))
    got = result.get(timeout=TIMEOUT)
    assert got == {"tag": tag, "values": [2 * i for i in range(size)]}
    status = app.backend.chord_status(result.parent.id)
    assert (status["size"], status["done"], status["state"], status["callback_id"]) == (
        size,
        size,
        "dispatched",
        result.id,
    )
    # The worker ran the callback once, from the message the service sent,
    # and no chord_unlock task polled for it.
    log = worker.read_text()
    assert len(re.findall(rf"Task e2e_tasks\.collect\[{result.id}\] received", log)) == 1
    assert "chord_unlock" not in log


def test_a_chord_with_a_failed_part_fails_its_callback_and_calls_the_errback(worker):
    errback_id = f"errback-{uuid.uuid4().hex}"
    callback = collect.s("never").on_error(record_error.s("chord failed").set(task_id=errback_id))
    result = chord([add.s(1, 1), fail.s("part broke"), add.s(2, 2)])(callback)
    # As with any Celery backend, get() on the chord's result raises the
    # header's error if it has seen it already, else the callback's
    # ChordError; the callback's own result holds the ChordError.
    with pytest.raises((ValueError, ChordError)):
        result.get(timeout=TIMEOUT)
    with pytest.raises(ChordError) as err:
        AsyncResult(result.id, app=app).get(timeout=TIMEOUT)
    failed_part = result.parent.results[1].id
    assert f"Dependency {failed_part} raised ValueError" in str(err.value)
    assert result.state == "FAILURE"
    assert AsyncResult(errback_id, app=app).get(timeout=TIMEOUT) == {"failed": result.id, "note": "chord failed"}
    assert app.backend.chord_status(result.parent.id)["state"] == "failed"


def test_a_chords_status_counts_its_parts_by_state_from_one_request(worker):
    header = [fail.s(f"part {i} broke") if i in (2, 5, 7) else add.s(i, 1) for i in range(10)]
    result = chord(header)(collect.s("never"))
    with pytest.raises((ValueError, ChordError)):
        result.get(timeout=TIMEOUT)
    # get() raises the first failed part's own error as soon as it is
    # stored (it follows the result's parents, as on Redis): the chord may
    # not be counted yet.
    deadline = time.monotonic() + TIMEOUT
    status = app.backend.chord_status(result.parent.id, failed_ids=True)
    while status is None or status["done"] < 10:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
        status = app.backend.chord_status(result.parent.id, failed_ids=True)
    assert (status["succeeded"], status["failed"], status["pending"]) == (7, 3, 0), status
    assert status["failed_ids"] == [result.parent.results[i].id for i in (2, 5, 7)]
    assert status["failed_ids_truncated"] is False
    assert "failed_ids" not in app.backend.chord_status(result.parent.id)


def test_a_chord_that_tolerates_failed_parts_calls_back_with_their_exceptions(worker):
    failing = (10, 50, 90)
    header = [fail.s(f"part {i}") if i in failing else add.s(i, 0) for i in range(100)]
    tolerant = chord(header)(collect.s("tolerant").set(tolerated_failures=5))
    # A fresh AsyncResult: the callback's own result, not its header's errors.
    values = AsyncResult(tolerant.id, app=app).get(timeout=TIMEOUT)["values"]
    assert len(values) == 100
    failed = [i for i, v in enumerate(values) if is_failure(v)]
    assert failed == list(failing)
    assert values[10]["exc_message"] == ["part 10", 42]
    assert all(values[i] == i for i in range(100) if i not in failing)
    status = app.backend.chord_status(tolerant.parent.id)
    assert (status["state"], status["succeeded"], status["failed"]) == ("dispatched", 97, 3), status
    # Past what it tolerates, the chord fails as Celery's do.
    header = [fail.s(f"part {i}") if i in failing else add.s(i, 0) for i in range(100)]
    strict = chord(header)(collect.s("strict").set(tolerated_failures=2))
    with pytest.raises(ChordError):
        AsyncResult(strict.id, app=app).get(timeout=TIMEOUT)


def test_a_failed_chord_is_redriven_and_calls_back_once_with_every_result(worker, tmp_path):
    flaky = (3, 40, 77)
    header = [fail_first.s(str(tmp_path), i) if i in flaky else add.s(i, 0) for i in range(100)]
    result = chord(header)(collect.s("redriven"))
    with pytest.raises(ChordError):
        AsyncResult(result.id, app=app).get(timeout=TIMEOUT)
    status = app.backend.chord_status(result.parent.id)
    assert (status["state"], status["failed"], status["succeeded"]) == ("failed", 3, 97), status
    answer = app.backend.redrive_chord(result.parent.id)
    assert (answer["state"], answer["redriving"], answer["redrives"]) == ("redriving", 3, 1), answer
    # Only the failed parts ran again; the callback runs once, with every result.
    values = AsyncResult(result.id, app=app).get(timeout=TIMEOUT)["values"]
    assert values == list(range(100))
    status = app.backend.chord_status(result.parent.id)
    assert (status["state"], status["failed"], status["succeeded"]) == ("dispatched", 0, 100), status
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == list(flaky)
    ran = rf"Task e2e_tasks.collect\[{result.id}\] succeeded"
    deadline = time.monotonic() + 30
    while not re.search(ran, worker.read_text()):
        assert time.monotonic() < deadline, "the worker did not log the callback's run"
        time.sleep(0.2)
    assert len(re.findall(ran, worker.read_text())) == 1
    # Nothing failed any more: a second redrive is refused, clearly.
    with pytest.raises(DynachordError) as refused:
        app.backend.redrive_chord(result.parent.id)
    assert refused.value.code == "redrive_refused"


def test_a_saved_group_is_restored_and_deleted(worker):
    result = group(add.s(i, 1) for i in range(5))()
    result.save()
    restored = GroupResult.restore(result.id, app=app)
    assert [r.id for r in restored.results] == [r.id for r in result.results]
    assert restored.get(timeout=TIMEOUT) == [1, 2, 3, 4, 5]
    result.delete()
    assert GroupResult.restore(result.id, app=app) is None


def test_forget(worker):
    result = add.delay(2, 3)
    assert result.get(timeout=TIMEOUT) == 5
    result.forget()
    assert AsyncResult(result.id, app=app).state == "PENDING"


def test_results_expire_after_result_expires():
    short = Celery("short", set_as_current=False)
    short.conf.update(result_backend=app.conf.result_backend, result_expires=2)
    task_id = f"expiring-{uuid.uuid4().hex}"
    short.backend.store_result(task_id, {"v": 1}, "SUCCESS")
    assert AsyncResult(task_id, app=short).get(timeout=5) == {"v": 1}
    # Expiry has whole-second resolution: poll until the result is gone.
    deadline = time.monotonic() + 30
    while AsyncResult(task_id, app=short).state != "PENDING":
        assert time.monotonic() < deadline, "the result did not expire"
        time.sleep(0.2)


def test_get_waits_on_the_server_and_returns_as_soon_as_the_result_is_stored():
    task_id = f"late-{uuid.uuid4().hex}"
    backend = app.backend
    pending = AsyncResult(task_id, app=app)
    started = time.monotonic()
    with pytest.raises(app.backend.TimeoutError):
        pending.get(timeout=1)
    assert time.monotonic() - started < 5
    threading.Timer(1.0, lambda: backend.store_result(task_id, "late", "SUCCESS")).start()
    started = time.monotonic()
    assert AsyncResult(task_id, app=app).get(timeout=15) == "late"
    assert time.monotonic() - started < 5
