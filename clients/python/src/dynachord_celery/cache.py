"""A processing cache on dynachord, written the way Backache's users write it.

A client asks for the result of operation ``op`` on resource ``uri``. A hit
answers at once; a miss hands the processing to a Celery task, and when it
finishes the operation's callback receives ``(result, [cb_args, ...])``: the
``cb_args`` of every client that asked while it ran. A failed processing
goes to the quarantine consumer with ``(operation, uri, exception)``.

The service does the bookkeeping (one conditional write decides who
delegates; see the repository's ``docs/CACHE.md``)::

    cache = ProcessingCache(app)

    @cache.operation("thumbnail")
    def thumbnail(uri, context, attempt=1):
        try:
            return render(uri)
        except TemporaryError:
            if attempt < 3:
                raise context.retry(countdown=5, attempt=attempt + 1)
            raise context.quarantine(reason="gave up")

    @cache.callback("thumbnail")
    def thumbnail_done(result):
        value, cb_args = result
        ...

    outcome = cache.get_or_delegate("thumbnail", "s3://bucket/a.png", cb_args={"user": 7})
    if outcome.hit:
        use(outcome.result)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from .backend import RESULTS_REF, DynachordBackend, sent_by_the_service
from .client import Client, DynachordError

#: Task names the package registers: ``{OPERATION_PREFIX}{op}`` runs the
#: processing, ``{CALLBACK_PREFIX}{op}`` the callback.
OPERATION_PREFIX = "dynachord.cache.operation."
CALLBACK_PREFIX = "dynachord.cache.callback."
#: The quarantine consumer's default task name (Backache's is
#: ``backache.quarantine-consumer``).
QUARANTINE_TASK = "dynachord.cache.quarantine-consumer"

#: Keys per request (the service's CACHE_MAX_KEYS default).
BULK_CHUNK = 1000


class ProcessingInQuarantineException(Exception):
    """Raised by an operation that gives up on a resource for good
    (``raise context.quarantine(**kwargs)``); the quarantine consumer gets
    it back with those ``op_kwargs``."""

    def __init__(self, op_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__(dict(op_kwargs or {}))
        self.op_kwargs = dict(op_kwargs or {})


class OperationContext:
    """What an operation gets to manage itself: :meth:`retry` later, or
    :meth:`quarantine` for good. Both return the exception to raise."""

    def __init__(self, task: Any, operation: str, uri: str) -> None:
        self.task, self.operation, self.uri = task, operation, uri

    def retry(self, countdown: float | None = None, **kwargs: Any) -> BaseException:
        """Runs the operation again after ``countdown`` seconds with
        ``kwargs``, through Celery's own retry: the same task id, so the
        same cache entry, whose lease the retry renews."""
        exc: BaseException = self.task.retry(countdown=countdown, kwargs=kwargs, throw=False)
        return exc

    def quarantine(self, **kwargs: Any) -> ProcessingInQuarantineException:
        return ProcessingInQuarantineException(kwargs)


@dataclass
class Outcome:
    """The answer for one ``(op, uri)``: a hit (``hit`` and ``result``), a
    processing (``task_id`` of the processing, ``callback_id`` of the
    callback that will get the result, ``delegated`` when this request
    started it), or ``quarantined`` (with ``error``, until ``until``)."""

    op: str
    uri: str
    state: str
    hit: bool = False
    result: Any = None
    task_id: str | None = None
    callback_id: str | None = None
    delegated: bool = False
    waiters: int = 0
    until: int | None = None
    error: Any = None


@dataclass
class BulkOutcome:
    """``hits``: ``{(op, uri): {"cb_args": ..., "result": ...}}`` (what
    ``hits_callback`` gets); ``processing`` and ``quarantined`` map keys to
    their :class:`Outcome`."""

    hits: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    processing: dict[tuple[str, str], Outcome] = field(default_factory=dict)
    quarantined: dict[tuple[str, str], Outcome] = field(default_factory=dict)


@dataclass
class _Operation:
    task: str
    queue: str | None
    ttl: int | None
    lease: int | None
    quarantine_for: int | None
    callback: str | None = None
    callback_queue: str | None = None


class ProcessingCache:
    """Operations, their callbacks and the quarantine consumer, registered on
    ``app`` (whose result backend must be dynachord), and the client calls.

    ``ttl`` (seconds a result stays cached), ``lease`` (seconds a
    processing holds its key before a request may delegate it again) and
    ``quarantine_for`` (seconds a failed key answers ``quarantined``; 0, the
    default, lets the next request delegate again) are defaults each
    operation may override. ``queue`` is where processings go,
    ``callback_queue`` callbacks, ``quarantine_queue`` quarantine messages
    (``None``: the service's default queue)."""

    def __init__(
        self,
        app: Celery,
        *,
        queue: str | None = None,
        callback_queue: str | None = None,
        quarantine_task: str | None = QUARANTINE_TASK,
        quarantine_queue: str | None = None,
        ttl: int | None = None,
        lease: int | None = None,
        quarantine_for: int | None = None,
    ) -> None:
        self.app = app
        self.queue, self.callback_queue = queue, callback_queue
        self.quarantine_task, self.quarantine_queue = quarantine_task, quarantine_queue
        self.ttl, self.lease, self.quarantine_for = ttl, lease, quarantine_for
        self._operations: dict[str, _Operation] = {}

    # -- registration --------------------------------------------------------

    def operation(
        self,
        name: str,
        *,
        queue: str | None = None,
        ttl: int | None = None,
        lease: int | None = None,
        quarantine_for: int | None = None,
        **task_options: Any,
    ) -> Callable[[Callable[..., Any]], Any]:
        """Registers ``fn(uri, context, **kwargs)`` as operation ``name``;
        returns the Celery task that runs it."""

        def register(fn: Callable[..., Any]) -> Any:
            task_name = OPERATION_PREFIX + name

            def run(task: Any, uri: str, **kwargs: Any) -> Any:
                return fn(uri, OperationContext(task, name, uri), **kwargs)

            run.__name__ = run.__qualname__ = getattr(fn, "__name__", name)
            # The operation counts its own retries; STARTED renews its lease.
            options = {"max_retries": None, "track_started": True, **task_options}
            task = self.app.task(name=task_name, bind=True, **options)(run)
            spec = self._operations.get(name)
            self._operations[name] = _Operation(
                task=task_name,
                queue=queue if queue is not None else self.queue,
                ttl=ttl if ttl is not None else self.ttl,
                lease=lease if lease is not None else self.lease,
                quarantine_for=quarantine_for if quarantine_for is not None else self.quarantine_for,
                callback=spec.callback if spec else None,
                callback_queue=spec.callback_queue if spec else None,
            )
            return task

        return register

    def callback(
        self, name: str, *, queue: str | None = None, **task_options: Any
    ) -> Callable[[Callable[..., Any]], Any]:
        """Registers ``fn(result)`` as the callback of operation ``name``:
        ``result`` is ``(operation result, [cb_args, ...])``. Returns the
        Celery task."""

        def register(fn: Callable[..., Any]) -> Any:
            task_name = CALLBACK_PREFIX + name

            def run(task: Any, result: Any) -> Any:
                value, cb_args = result
                if isinstance(value, dict) and set(value) == {RESULTS_REF} and sent_by_the_service(task):
                    # Too large for the message: the processing's own result.
                    value = _backend_client(task.app).get_task(str(value[RESULTS_REF]["task_id"]))["result"]
                return fn((value, list(cb_args)))

            run.__name__ = run.__qualname__ = getattr(fn, "__name__", name)
            task = self.app.task(name=task_name, bind=True, **task_options)(run)
            spec = self._operations.get(name)
            if spec is None:
                spec = _Operation(OPERATION_PREFIX + name, self.queue, self.ttl, self.lease, self.quarantine_for)
                self._operations[name] = spec
            spec.callback = task_name
            spec.callback_queue = queue if queue is not None else self.callback_queue
            return task

        return register

    def quarantine_consumer(self, fn: Callable[[str, str, BaseException], Any]) -> Any:
        """Registers ``fn(operation, uri, exc)`` as the quarantine consumer
        (task ``quarantine_task``): ``exc`` is the processing's exception,
        a :class:`ProcessingInQuarantineException` with its ``op_kwargs``
        when the operation quarantined itself."""
        if not self.quarantine_task:
            raise ValueError("this cache has no quarantine task (quarantine_task=None)")

        def run(task: Any, operation: str, uri: str, exc: Any) -> Any:
            return fn(operation, uri, _exception(task.app, exc))

        run.__name__ = run.__qualname__ = getattr(fn, "__name__", "quarantine_consumer")
        return self.app.task(name=self.quarantine_task, bind=True)(run)

    # -- client calls --------------------------------------------------------

    @property
    def client(self) -> Client:
        return _backend_client(self.app)

    def _spec(self, op: str) -> dict[str, Any]:
        spec = self._operations.get(op)
        if spec is None:
            raise KeyError(f"no operation {op!r} is registered with this ProcessingCache")
        out: dict[str, Any] = {"task": spec.task}
        if spec.queue:
            out["queue"] = spec.queue
        if spec.callback:
            out["callback"] = {"task": spec.callback, **({"queue": spec.callback_queue} if spec.callback_queue else {})}
        if self.quarantine_task:
            quarantine = {"task": self.quarantine_task}
            if self.quarantine_queue:
                quarantine["queue"] = self.quarantine_queue
            out["quarantine"] = quarantine
        for name in ("ttl", "lease", "quarantine_for"):
            value = getattr(spec, name)
            if value is not None:
                out[name] = int(value)
        return out

    def get_or_delegate(self, op: str, uri: str, cb_args: Any = None, settle_timeout: float = 30.0) -> Outcome:
        """The result of ``op`` on ``uri`` if cached (``outcome.hit``), else
        the processing it was handed to (``outcome.task_id``; its callback
        will get ``cb_args`` among the others)."""
        # The request id stays the same when the client sends the request
        # again (no answer, a 5xx): the service appends cb_args once.
        body = {"op": op, "uri": uri, "cb_args": cb_args, "operation": self._spec(op), "request_id": _request_id()}
        deadline = time.monotonic() + settle_timeout
        while True:
            answer = self.client.request("POST", "/v1/cache/get-or-delegate", body=body).json()
            if answer.get("state") != "settling" or time.monotonic() >= deadline:
                return self._outcome(answer)
            # The processing just failed and is being quarantined: ask again shortly.
            time.sleep(0.1)

    def bulk_get_or_delegate(
        self,
        requests: Mapping[str, Iterable[str]],
        cb_args: Any = None,
        hits_callback: Callable[[dict[tuple[str, str], dict[str, Any]]], Any] | None = None,
        settle_timeout: float = 30.0,
    ) -> BulkOutcome:
        """Many keys at once (``{op: [uri, ...]}``): hits are answered (and
        given to ``hits_callback`` as ``{(op, uri): {"cb_args", "result"}}``),
        misses delegated or joined, each with ``cb_args``."""
        keys = [(op, uri) for op, uris in requests.items() for uri in uris]
        operations = {op: self._spec(op) for op in requests}
        outcome = BulkOutcome()
        pending = list(dict.fromkeys(keys))
        deadline = time.monotonic() + settle_timeout
        while pending:
            again: list[tuple[str, str]] = []
            for start in range(0, len(pending), BULK_CHUNK):
                chunk = pending[start : start + BULK_CHUNK]
                body = {
                    "requests": [{"op": op, "uri": uri, "cb_args": cb_args} for op, uri in chunk],
                    "operations": {op: operations[op] for op in {op for op, _ in chunk}},
                    "request_id": _request_id(),
                }
                answers = self.client.request("POST", "/v1/cache/get-or-delegate", body=body).json()["results"]
                for key, answer in zip(chunk, answers):
                    # Left out past the response's size, or settling: asked again (a hit adds no cb_args).
                    if answer.get("result_omitted") or (answer["state"] == "settling" and time.monotonic() < deadline):
                        again.append(key)
                        continue
                    found = self._outcome(answer)
                    if found.hit:
                        outcome.hits[key] = {"cb_args": cb_args, "result": found.result}
                    elif found.state == "quarantined":
                        outcome.quarantined[key] = found
                    else:
                        outcome.processing[key] = found
            if again:
                time.sleep(0.05)
            pending = again
        if hits_callback is not None and outcome.hits:
            hits_callback(outcome.hits)
        return outcome

    def invalidate(self, op: str, uri: str) -> bool:
        """Forgets a cached (or quarantined) result; ``False`` when there was
        none, or a processing of it is running (its waiters are owed a callback)."""
        answer = self.client.request("POST", "/v1/cache/invalidate", body={"op": op, "uri": uri}).json()
        return bool(answer.get("invalidated"))

    def state(self, op: str, uri: str) -> dict[str, Any]:
        """The entry's state: ``cached``, ``processing`` (with ``waiters``),
        ``settling``, ``quarantined`` or ``missing``."""
        answer: dict[str, Any] = self.client.request("POST", "/v1/cache/entry", body={"op": op, "uri": uri}).json()
        return answer

    def _outcome(self, answer: Mapping[str, Any]) -> Outcome:
        state = str(answer["state"])
        if state == "error":
            error = answer.get("error") or {}
            raise DynachordError(
                "POST",
                "/v1/cache/get-or-delegate",
                int(error.get("status") or 0),
                str(error.get("code")),
                str(error.get("message")),
            )
        outcome = Outcome(
            op=str(answer["op"]),
            uri=str(answer["uri"]),
            state=state,
            task_id=answer.get("task_id"),
            callback_id=answer.get("callback_id"),
            delegated=bool(answer.get("delegated")),
            waiters=int(answer.get("waiters") or 0),
            until=answer.get("until"),
            error=answer.get("error"),
        )
        if state == "cached":
            outcome.hit = True
            if "result_task" in answer:
                # A large result stays on the processing's task.
                outcome.result = self.client.get_task(str(answer["result_task"]))["result"]
            else:
                outcome.result = answer.get("result")
        return outcome


def _request_id() -> str:
    """A get-or-delegate request's id (see ``docs/CACHE.md``)."""
    return uuid.uuid4().hex


def _backend_client(app: Celery) -> Client:
    backend = app.backend
    if not isinstance(backend, DynachordBackend):
        raise TypeError(f"the processing cache needs dynachord as the result backend, not {type(backend).__name__}")
    return backend.client


def _exception(app: Celery, exc: Any) -> BaseException:
    """The processing's exception, from the JSON Celery stored it as."""
    if isinstance(exc, Mapping) and exc.get("exc_type") == ProcessingInQuarantineException.__name__:
        message = exc.get("exc_message") or [{}]
        first = message[0] if isinstance(message, list) and message else {}
        return ProcessingInQuarantineException(first if isinstance(first, Mapping) else {})
    if isinstance(exc, Mapping):
        try:
            rebuilt: BaseException = app.backend.exception_to_python(dict(exc))
            return rebuilt
        except Exception:  # an exception type this process cannot rebuild
            return Exception(exc)
    return Exception(exc)


__all__ = [
    "BulkOutcome",
    "OperationContext",
    "Outcome",
    "ProcessingCache",
    "ProcessingInQuarantineException",
]
