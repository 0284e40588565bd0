"""The Celery app of the end-to-end tests: SQS broker (moto's server), result
backend dynachord (the local stack). Run by a real `celery worker` and
imported by the tests, which send its tasks."""

import datetime
import os
import time
import uuid

from celery import Celery
from dynachord_celery.sqs_fix import survive_sqs_server_errors

# kombu 5.7's SQS consumer dies on one 5xx from SQS (see sqs_fix); moto
# answers those under load. test_sqs_fault.py shows the worker with and
# without it.
if not os.environ.get("E2E_WITHOUT_SQS_FIX"):
    survive_sqs_server_errors()

app = Celery("e2e_tasks")
app.conf.update(
    # E2E_BROKER: test_large.py's arguments of megabytes go through a Redis
    # broker (a queue message of SQS holds at most 1 MiB); SQS otherwise.
    broker_url=os.environ.get("E2E_BROKER") or "sqs://local:local@",
    broker_transport_options={"region": "us-east-1", "polling_interval": 0.1, "wait_time_seconds": 1},
    # E2E_RESULT_BACKEND: the reference run of test_canvas.py uses Celery's
    # own Redis backend, everything else dynachord.
    result_backend=os.environ.get("E2E_RESULT_BACKEND")
    or "dynachord+" + os.environ.get("DYNACHORD_ENDPOINT", "http://127.0.0.1:9000"),
    result_extended=True,
    # Each test run has its own queue, so runs never take each other's tasks.
    task_default_queue=os.environ["E2E_QUEUE"],
    worker_prefetch_multiplier=8,
)
# E2E_RESULT_SERIALIZER, E2E_RESULT_COMPRESSION: test_serializers.py's
# workers store results with another serializer, compressed or not.
if os.environ.get("E2E_RESULT_SERIALIZER"):
    app.conf.result_serializer = os.environ["E2E_RESULT_SERIALIZER"]
    app.conf.result_accept_content = [app.conf.result_serializer, "json"]
if os.environ.get("E2E_RESULT_COMPRESSION"):
    app.conf.result_compression = os.environ["E2E_RESULT_COMPRESSION"]
if not os.environ.get("E2E_RESULT_BACKEND"):
    # Every failure of the local stack shows: only the service's own
    # retryable answers (throttled, unavailable) are sent again, never a 500
    # or a request left without an answer.
    app.conf.result_backend_transport_options = {"retry_statuses": [429, 503], "retry_timeouts": False}


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def collect(values, tag):
    """A chord callback that shows what it was given, in order."""
    return {"tag": tag, "values": values}


@app.task
def fail(message):
    raise ValueError(message, 42)


@app.task
def fail_first(marks, value):
    """Fails the first time it runs for `value`, succeeds after: a part a
    redrive fixes. `marks` is a directory the test owns; a file in it says
    the task ran once."""
    try:
        os.close(os.open(os.path.join(marks, str(value)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return value
    raise ValueError("first run fails", value)


@app.task
def record_error(task_id, note):
    """An (old-style) errback: called with the failed task's id."""
    return {"failed": task_id, "note": note}


@app.task
def note_failure(request, exc, traceback):
    """A new-style errback (the form Celery's docs give): records what
    failed as the result of `<failed task's id>-noted`."""
    app.backend.store_result(f"{request.id}-noted", {"failed": request.id, "exc": type(exc).__name__}, "SUCCESS")


@app.task
def tsum(values):
    return sum(values)


@app.task(bind=True)
def stamps_seen(self, *args):
    """Shows the stamps its message carried (Celery's stamping visitors)."""
    return {"stamped_headers": sorted(self.request.stamped_headers or []), "stamps": self.request.stamps or {}}


@app.task(bind=True)
def progress(self, steps):
    """Reports PROGRESS states while it works (for get(on_message=...))."""
    import time

    for i in range(steps):
        self.update_state(state="PROGRESS", meta={"step": i, "of": steps})
        time.sleep(1.2)
    return "done"


@app.task(bind=True)
def replaced(self, x, kind):
    """Replaces itself (Task.replace) with a task, chain, group or chord
    of its own, which gives the result in its place."""
    return self.replace(replacement(x, kind))


@app.task(bind=True, run_once=True)
def replaced_once(self, x, kind):
    """`replaced`, under dynachord's run-once guard."""
    return self.replace(replacement(x, kind))


def replacement(x, kind):
    """What `replaced` replaces itself with."""
    from celery import chord, group

    by = {
        "task": lambda: add.s(x, 1),
        "chain": lambda: add.s(x, 1) | mul.s(2),
        "group": lambda: group(add.s(x, 1), add.s(x, 2)),
        "chord": lambda: chord([add.s(x, 1), add.s(x, 2)], tsum.s()),
        "sum, then add": lambda: tsum.s(x) | add.s(1),
        "a failure": lambda: fail.si(f"replaced {x}"),
        # As a chord's callback, `x` is the header's results.
        "a group of each": lambda: group(add.s(v, 1) for v in x),
    }
    return by[kind]()


@app.task(bind=True)
def retry_once(self, x):
    """Retries itself once (Celery's retry), then gives `x`."""
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)
    return x


@app.task
def get_inside(task_id):
    """Waits on another task's result inside a task: Celery refuses that
    (disable_sync_subtasks, on by default)."""
    from celery.result import AsyncResult

    return AsyncResult(task_id, app=app).get(timeout=5)


@app.task
def fail_loudly(size, seed):
    """Fails with a message of `size` hex characters (as `blob` makes them):
    its exception and its traceback are each that large."""
    import random

    raise ValueError(random.Random(seed).randbytes(size // 2 + 1).hex()[:size])


@app.task
def blob(size, seed):
    """`size` hex characters from a seeded generator: a large result that
    barely compresses, which the test can compute too."""
    import random

    return random.Random(seed).randbytes(size // 2 + 1).hex()[:size]


@app.task
def digest(values):
    """A chord callback for large results: how many, and a hash of them all."""
    import hashlib
    import json

    return {"count": len(values), "sha256": hashlib.sha256(json.dumps(values).encode()).hexdigest()}


# -- the processing cache (test_cache.py) ------------------------------------


from dynachord_celery.cache import ProcessingCache  # noqa: E402

cache = ProcessingCache(
    app,
    queue=os.environ["E2E_QUEUE"],
    callback_queue=os.environ["E2E_QUEUE"],
    quarantine_queue=os.environ["E2E_QUEUE"],
    ttl=3600,
)


@cache.operation("measure")
def measure(uri, context):
    """Measures a uri; slow on a uri naming "slow", so concurrent misses overlap it."""
    if "slow" in uri:
        time.sleep(1.5)
    return {"uri": uri, "length": len(uri)}


@cache.callback("measure")
def measure_done(result):
    value, cb_args = result
    return {"result": value, "cb_args": cb_args}


@cache.operation("flaky")
def flaky(uri, context, attempt=1):
    """Fails its first attempt and retries itself, as Backache's example does."""
    if attempt < 2:
        raise context.retry(countdown=0.2, attempt=attempt + 1)
    return {"uri": uri, "attempt": attempt}


@cache.callback("flaky")
def flaky_done(result):
    value, cb_args = result
    return {"result": value, "cb_args": cb_args}


@cache.operation("broken")
def broken(uri, context):
    raise ValueError(f"cannot process {uri}")


@cache.operation("gives_up")
def gives_up(uri, context):
    raise context.quarantine(reason="not found", uri=uri)


@cache.quarantine_consumer
def quarantined(operation, uri, exc):
    return {
        "operation": operation,
        "uri": uri,
        "exc_type": type(exc).__name__,
        "exc": str(exc),
        "op_kwargs": getattr(exc, "op_kwargs", None),
    }


def _mark(marks, key, line):
    with open(os.path.join(marks, key), "a") as out:
        out.write(line + "\n")


def _starts(marks, key):
    try:
        with open(os.path.join(marks, key)) as seen:
            return sum(1 for line in seen if line.startswith("start"))
    except FileNotFoundError:
        return 0


@app.task(run_once=True, run_once_lease=3, acks_late=True)
def once(marks, key, first_seconds):
    """A task under dynachord's run-once guard that counts its runs: a line
    `start <run>` in `marks/key` as it begins and `done <run>` as it ends.
    Its first run takes `first_seconds`, later runs none. Returns the run's
    own id, so a caller can tell which run's result it got."""
    run = uuid.uuid4().hex
    first = _starts(marks, key) == 0
    _mark(marks, key, f"start {run}")
    if first:
        time.sleep(first_seconds)
    _mark(marks, key, f"done {run}")
    return run


@app.task
def collect_once(values, marks, key):
    """A chord callback that counts its runs (`marks/key`); the guard is on
    for it because the service sends it."""
    run = uuid.uuid4().hex
    _mark(marks, key, f"start {run}")
    return {"values": values, "run": run}


def rich_value(serializer):
    """A value JSON cannot hold, made of what `serializer` can: a tuple,
    bytes, a datetime (as each of them allows)."""
    value = {"tuple": (1, 2), "bytes": b"\x00\xff", "when": datetime.datetime(2026, 12, 5, 1, 2, 3)}
    if serializer == "yaml":
        del value["bytes"]
    if serializer == "msgpack":
        del value["when"]
    return value


@app.task
def rich(serializer):
    return rich_value(serializer)
