"""A task runs once per id, even when its message arrives twice.

SQS delivers at least once: a message comes back after its visibility
timeout while a worker still runs it, or twice for no visible reason. With
this guard, a worker about to run a task first claims its id on the service
with one conditional write (the STARTED store ``task_track_started`` makes
anyway): the claim succeeds only if the task is not ready and no other live
claim holds it. The claim carries a lease the running worker renews; a
delivery that finds it lapsed (its claimer died) takes over.

- A delivery that finds the task ready (SUCCESS, FAILURE, REVOKED) does not
  run it, and its message is acknowledged.
- One that finds a live claim does not run it either; on SQS with
  ``acks_late`` its message comes back once the claim's lease has passed (so
  a claimer that dies is replaced), else it is acknowledged.

Both are logged here and counted by the service (``TaskRunsRefused``).

Opt in app-wide (``dynachord_run_once = True``) or per task
(``@app.task(run_once=True)``; ``run_once=False`` opts a task out). Messages
the service sends (chord callbacks and errbacks, the processing cache's
tasks) use it unless their task opts out. ``dynachord_run_once_lease`` (or a
task's ``run_once_lease``) is the lease in seconds, 60 by default, renewed
every third of it.

The worker is hooked when it starts (``worker_init``): each task's
``before_start`` refuses a run whose claim was refused, and its ``Request``
(in the worker's main process) puts a message whose task runs elsewhere
back on SQS instead of deleting it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import uuid
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery import signals, states
from celery.exceptions import Ignore
from celery.utils.imports import symbol_by_name

from .backend import RUN_ATTR, DynachordBackend, sent_by_the_service
from .client import DynachordError, DynachordUnavailable, _dumps

logger = logging.getLogger(__name__)

#: The app-wide setting, and a task's option, that turn the guard on.
SETTING = "dynachord_run_once"
TASK_OPTION = "run_once"
#: The claim's lease in seconds: the app's setting, and a task's option.
LEASE_SETTING = "dynachord_run_once_lease"
LEASE_OPTION = "run_once_lease"
DEFAULT_LEASE = 60
#: The header on a chord part a redrive sends again (its number).
REDRIVE_HEADER = "dynachord_redrive"
#: The service's bound on a claim's lease.
MAX_LEASE = 3600
#: A claim's body stays small: past this, it goes without the task's
#: arguments (its result carries them).
CLAIM_BODY_BYTES = 64 * 1024
#: SQS's bound on a message's visibility timeout.
MAX_VISIBILITY = 43200


class AlreadyRan(Ignore):
    """A delivery of a task whose result is ready: it is not run again."""

    def __init__(self, task_id: str, status: str | None) -> None:
        super().__init__(task_id, status)
        self.task_id, self.status = task_id, status

    def __str__(self) -> str:
        return f"task {self.task_id} is already {self.status}: not run again"


class RunDeferred(Ignore):
    """A delivery of a task that another live claim holds (or whose claim
    could not be made): it is not run now, and its message comes back in
    ``retry_in`` seconds where the broker allows it."""

    def __init__(self, task_id: str, retry_in: float, reason: str) -> None:
        super().__init__(task_id, retry_in, reason)
        self.task_id, self.retry_in, self.reason = task_id, retry_in, reason

    def __str__(self) -> str:
        return f"task {self.task_id} not run now: {self.reason}"


def runs_once(task: Any) -> bool:
    """Whether ``task`` runs under the guard: its own ``run_once`` option
    first, then the app's setting, then whether the service sent it."""
    option = getattr(task, TASK_OPTION, None)
    if option is not None:
        return bool(option)
    if task.app.conf.get(SETTING):
        return True
    return sent_by_the_service(task)


def lease_of(task: Any) -> int:
    """The claim's lease for ``task``, in seconds, within the service's bounds."""
    lease = getattr(task, LEASE_OPTION, None) or task.app.conf.get(LEASE_SETTING) or DEFAULT_LEASE
    return max(1, min(MAX_LEASE, int(lease)))


class Run:
    """One delivery's claim on its task: made before the task runs, renewed
    every third of its lease while it runs, by what the task stores before it
    is done (STARTED, progress states) and by a thread of its own."""

    def __init__(self, backend: DynachordBackend, task_id: str, lease: int, rerun: bool = False) -> None:
        self.backend, self.task_id, self.lease, self.rerun = backend, task_id, lease, rerun
        self.token = uuid.uuid4().hex
        self.refusal: Ignore | None = None
        self.body: dict[str, Any] = {}
        #: The claim was a STARTED store: track_started's own is not made again.
        self.started_stored = False
        #: The service refused the claim for good: the task runs unguarded.
        self.unguarded = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self, body: dict[str, Any]) -> bool:
        """Claims the task with ``body`` (STARTED); on refusal keeps why."""
        try:
            answer = self.backend.client.claim_task(self.task_id, body, self.token, self.lease, self.rerun)
        except DynachordUnavailable as exc:
            # Throttled or unreachable after the client's retries: run it later.
            self.refusal = RunDeferred(self.task_id, self.lease, f"its claim could not be made ({exc})")
            return False
        except DynachordError as exc:
            # Refused for good (a service too old to know claims, say): no
            # later delivery would do better, so it runs without the guard.
            self.unguarded = True
            logger.error("dynachord: task %s runs without the run-once guard: %s", self.task_id, exc)
            return False
        if answer.claimed:
            self.body, self.started_stored = body, body.get("status") == states.STARTED
            return True
        if answer.held_for is None:
            self.refusal = AlreadyRan(self.task_id, answer.stored_status)
        else:
            reason = f"another worker runs it (its claim lives {answer.held_for:.1f} s more unless renewed)"
            self.refusal = RunDeferred(self.task_id, answer.held_for, reason)
        return False

    def store(self, body: dict[str, Any], state: str) -> None:
        """A store the task makes before it is done: it renews the claim,
        except RETRY, which gives it up (the retry's delivery claims anew).
        A run that holds no claim stores nothing of its own."""
        if self.refusal is not None:
            return
        if state == states.STARTED and self.started_stored:
            self.started_stored = False
            return
        with self._lock:
            if state == states.RETRY:
                self._stop.set()
                self.backend.client.put_task(self.task_id, body)
                return
            self._renew(body)

    def _renew(self, body: dict[str, Any]) -> None:
        answer = self.backend.client.claim_task(self.task_id, body, self.token, self.lease, self.rerun)
        if answer.claimed:
            self.body = body
            return
        self._stop.set()
        logger.error(
            "dynachord: task %s lost its claim while running (%s): another delivery may run it too; "
            "renew more often than the lease (%d s)",
            self.task_id,
            answer.stored_status,
            self.lease,
        )

    def release(self) -> None:
        """Gives the claim up, the task still STARTED: a task that replaces
        itself (``Task.replace``) hands its id to the replacement, which
        must be able to claim it (a group's or chord's replacement runs as
        a callback the service sends, under the guard, with this very id).
        A plain store without a claim clears the claim."""
        with self._lock:
            self._stop.set()
            if self.refusal is None and self.body:
                self.backend.client.put_task(self.task_id, self.body)

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renewing, name=f"dynachord-claim-{self.task_id}", daemon=True)
        self._thread.start()

    def _renewing(self) -> None:
        while not self._stop.wait(self.lease / 3):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._renew(self.body)
                except DynachordError as exc:
                    logger.warning("dynachord: the claim of task %s was not renewed this time: %s", self.task_id, exc)

    def stop(self) -> None:
        self._stop.set()


def _claim_before_run(sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Before a task runs (``task_prerun``, before track_started's store):
    claims it if it runs under the guard."""
    request = getattr(task, "request", None)
    backend = getattr(task, "backend", None)
    if request is None or task_id is None or getattr(request, "is_eager", False):
        return
    if not isinstance(backend, DynachordBackend) or not runs_once(task):
        return
    # A chord part a redrive sent again runs over its FAILURE.
    rerun = sent_by_the_service(task) and getattr(request, REDRIVE_HEADER, None) is not None
    run = Run(backend, task_id, lease_of(task), rerun)
    meta = {"pid": os.getpid(), "hostname": getattr(request, "hostname", None)}
    body = backend._store_body(task_id, meta, states.STARTED, request=request)
    body.pop("chord", None)
    if len(_dumps(body)) > CLAIM_BODY_BYTES:
        # Arguments too large for a claim: its result will carry them.
        body.pop("args", None)
        body.pop("kwargs", None)
    setattr(request, RUN_ATTR, run)
    if run.claim(body):
        run.start_renewing()
    elif run.unguarded:
        delattr(request, RUN_ATTR)
    else:
        logger.info("dynachord: %s[%s] %s", task.name, task_id, run.refusal)


def _stop_renewing(sender: Any = None, task: Any = None, **_: Any) -> None:
    run = getattr(getattr(task, "request", None), RUN_ATTR, None)
    if isinstance(run, Run):
        run.stop()


def refuse_unclaimed(task: Any) -> None:
    """In ``before_start``: a run whose claim was refused stops here, as
    Celery's ``Ignore`` (nothing stored, the message acknowledged, or put
    back by :func:`deferring`)."""
    run = getattr(getattr(task, "request", None), RUN_ATTR, None)
    if isinstance(run, Run) and run.refusal is not None:
        raise run.refusal


def _defer(message: Any, seconds: float) -> bool:
    """Leaves an SQS message to come back in ``seconds`` (its visibility
    timeout set to that) and releases its delivery without deleting it.
    ``False`` when the message is not an SQS one or the call failed."""
    info = getattr(message, "delivery_info", None) or {}
    sqs_message, queue_url = info.get("sqs_message"), info.get("sqs_queue")
    channel = getattr(message, "channel", None)
    if not isinstance(sqs_message, dict) or not queue_url or channel is None:
        return False
    try:
        queue = channel.canonical_queue_name(info["routing_key"]) if info.get("routing_key") else None
        channel.sqs(queue=queue).change_message_visibility(
            QueueUrl=queue_url,
            ReceiptHandle=sqs_message["ReceiptHandle"],
            VisibilityTimeout=max(1, min(MAX_VISIBILITY, math.ceil(seconds) + 1)),
        )
        # The virtual channel's reject forgets the delivery; SQS's own
        # would delete the message.
        from kombu.transport import virtual

        virtual.Channel.basic_reject(channel, message.delivery_tag, requeue=False)  # type: ignore[no-untyped-call]
    except Exception as exc:  # the message is then acknowledged, as without the guard
        logger.warning("dynachord: the message could not be put back on SQS: %s", exc)
        return False
    return True


@functools.cache
def deferring(base: type) -> type:
    """``base`` (a worker Request class) that puts the message of a run
    deferred by the guard back on SQS for the claim's lease, when it was not
    acknowledged yet (``acks_late``); otherwise it acknowledges it as
    Celery does an ``Ignore``."""
    from celery.worker.state import task_ready

    class DeferringRequest(base):
        def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
            exc = exc_info.exception
            if isinstance(exc, ExceptionWithTraceback):
                exc = exc.exc
            acknowledged = bool(getattr(self, "acknowledged", False))
            if isinstance(exc, RunDeferred) and not acknowledged and _defer(self.message, exc.retry_in):
                task_ready(self)
                self.acknowledged = True
                logger.info("dynachord: %s's message comes back in %.0f s", exc.task_id, exc.retry_in)
                return None
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    DeferringRequest.__name__ = DeferringRequest.__qualname__ = f"Deferring{base.__name__}"
    return DeferringRequest


def guard(task: Any) -> None:
    """Hooks one task into the guard: its ``before_start`` refuses a run
    whose claim was refused, its ``on_replace`` gives the claim up before
    the replacement is sent, and its ``Request`` defers such a message."""
    cls = type(task)
    if "_dynachord_guarded" not in cls.__dict__:
        own = cls.before_start
        own_replace = cls.on_replace

        def before_start(self: Any, task_id: str, args: Any, kwargs: Any) -> Any:
            refuse_unclaimed(self)
            return own(self, task_id, args, kwargs)

        def on_replace(self: Any, sig: Any) -> Any:
            run = getattr(self.request, RUN_ATTR, None)
            if isinstance(run, Run):
                run.release()
            return own_replace(self, sig)

        cls.before_start = before_start
        cls.on_replace = on_replace
        cls._dynachord_guarded = True
    task.Request = deferring(symbol_by_name(task.Request))


def _hook_worker(sender: Any = None, **_: Any) -> None:
    """When a worker starts (``worker_init``, before its pool and
    consumers): hooks every task of an app whose backend is dynachord."""
    app = getattr(sender, "app", None)
    if app is None or not isinstance(app.backend, DynachordBackend):
        return
    for task in app.tasks.values():
        guard(task)


signals.task_prerun.connect(_claim_before_run, weak=False, dispatch_uid="dynachord-run-once-claim")
signals.task_postrun.connect(_stop_renewing, weak=False, dispatch_uid="dynachord-run-once-stop")
signals.worker_init.connect(_hook_worker, weak=False, dispatch_uid="dynachord-run-once-hook")
