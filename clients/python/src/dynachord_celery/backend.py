"""Celery result backend for dynachord.

    result_backend = "dynachord+https://<api-id>.execute-api.<region>.amazonaws.com"
    result_backend = "dynachord+http://127.0.0.1:9000"      # the local stack

What it does differently from Celery's key-value backends:

- a store is one HTTP call and one conditional write on the server (no read
  first; SUCCESS is never overwritten, a refused store is not an error);
- ``AsyncResult.get()`` long-polls on the server instead of polling;
- ``GroupResult.get()``/``join_native()`` fetch all results with batch-get;
- chords are joined on the server: each header part carries its chord when
  it stores its result, the service counts the parts, joins the results in
  order and sends the callback once. Workers never poll, never count and
  never send the callback; there is no ``celery.chord_unlock``;
- results of any size: a large result goes to the service's S3 bucket
  through a presigned URL and comes back the same way; a chord callback
  whose results are too large for a queue message receives them all the
  same (see :func:`_resolve_chord_results`);
- a failed chord's errbacks are sent by the service; a new-style errback
  (``def on_error(request, exc, traceback)``) is called with the failed
  callback's request and its ChordError, as Celery's own backends call it
  (see :func:`_call_new_style_errback`).
"""

from __future__ import annotations

import base64
import copy
import functools
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from celery import signals, states
from celery.app.task import Context
from celery.backends.base import BaseBackend, compress_payload, decompress_payload
from celery.exceptions import ChordError, ImproperlyConfigured
from celery.result import GroupResult, result_from_tuple
from celery.utils.functional import arity_greater
from kombu.serialization import loads
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads
from vine import promise

from .client import Client, ClientOptions, DynachordError, DynachordTimeout, DynachordUnavailable

logger = logging.getLogger(__name__)

#: The task meta fields the service stores (Celery's, extended ones included).
META_FIELDS = (
    "status",
    "result",
    "traceback",
    "children",
    "date_done",
    "group_id",
    "group_index",
    "parent_id",
    "root_id",
    "name",
    "args",
    "kwargs",
    "worker",
    "retries",
    "queue",
    "task_id",
)

#: The options of a chord's body for a header with a chain that ends in a
#: group (``chord([a, b | group(c, d)], body)``, whose results nest:
#: ``[ra, [rc, rd]]``). Celery gives such a group's tasks the chord's id and
#: their index within their own group, so the package gives each part a
#: slot of its own, by task id, and the service nests the results by the
#: shape: ``null`` for a part, a list for a group (docs/CELERY.md).
HEADER_SHAPE = "dynachord_header_shape"
HEADER_SLOTS = "dynachord_header_slots"
#: The slots travel in every part's message (``request.chord``): at most
#: this many bytes of them, a few thousand parts.
MAX_HEADER_SLOTS_BYTES = 64 << 10

#: Refusals of a chord part's chord at store time (see _refuse_chord).
REFUSED_CHORD_CODES = frozenset({"invalid_meta", "callback_not_allowed", "callback_too_large"})


def _header_layout(results: Any) -> tuple[list[Any], dict[str, int]] | None:
    """For a chord header whose results nest (a chain that ends in a group
    freezes to a ``GroupResult``): the shape of its results and each part's
    slot, by task id, in order. ``None`` for a flat header."""
    if not any(isinstance(r, GroupResult) for r in results):
        return None
    slots: dict[str, int] = {}

    def shape_of(items: Any) -> list[Any]:
        shape: list[Any] = []
        for r in items:
            if isinstance(r, GroupResult):
                shape.append(shape_of(r.results))
            elif r.id in slots:
                raise ChordError(f"task {r.id} is in the chord's header twice")
            else:
                slots[r.id] = len(slots)
                shape.append(None)
        return shape

    return shape_of(results), slots


def _slot_of(request: Any) -> int | None:
    """A chord part's slot: its ``group_index``, or, in a header whose
    results nest, the slot its chord's body gives its task id."""
    chord = getattr(request, "chord", None)
    options = chord.get("options") if isinstance(chord, Mapping) else None
    slots = options.get(HEADER_SLOTS) if isinstance(options, Mapping) else None
    if isinstance(slots, Mapping) and request.id in slots:
        return int(slots[request.id])
    return getattr(request, "group_index", None)


def _signatures(items: Any) -> list[dict[str, Any]]:
    """The signatures in a list (anything else is left out)."""
    items = items if isinstance(items, list) else [items]
    return [t for t in items if isinstance(t, dict) and t.get("task")]


def _tasks_of(sig: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The signatures inside a chain's or a group's signature, or a chord's
    header (none for a task)."""
    kwargs = sig.get("kwargs") or {}
    if sig.get("task") in ("celery.chain", "celery.group"):
        return _signatures(kwargs.get("tasks"))
    if sig.get("task") == "celery.chord":
        header = kwargs.get("header")
        if isinstance(header, dict) and header.get("task") == "celery.group":
            header = (header.get("kwargs") or {}).get("tasks")
        return _signatures(header)
    return []


def _body_of(sig: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A chord's body, as a list of none or one."""
    if sig.get("task") != "celery.chord":
        return []
    return _signatures((sig.get("kwargs") or {}).get("body"))


def _nested(sig: dict[str, Any]) -> list[dict[str, Any]]:
    """The signature and every one that runs after or inside it: the rest
    of its chain, a chain's or a group's tasks, a chord's header and body."""
    found = [sig]
    for child in _signatures((sig.get("options") or {}).get("chain")) + _tasks_of(sig) + _body_of(sig):
        found.extend(_nested(child))
    return found


#: The key of a value stored encoded by the app's result serializer:
#: ``{"dynachord_encoded": {"content_type", "content_encoding", "data"}}``,
#: ``data`` the payload (compressed with ``result_compression``) in base64.
ENCODED = "dynachord_encoded"


def _does_something(on_interval: Any) -> bool:
    """Whether calling ``on_interval`` can do anything: ``AsyncResult.get``
    always passes a promise, which holds nothing unless the result follows
    its parents (``follow_parents``) or the caller gave one."""
    if on_interval is None:
        return False
    if not isinstance(on_interval, promise):
        return True
    return on_interval.fun is not None or bool(on_interval._svpending or on_interval._lvpending)


def _is_opaque(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(ENCODED), dict)


def _json_holds(value: Any) -> bool:
    """Whether JSON (as Celery's json serializer writes it) holds ``value``
    and gives it back the same."""
    try:
        return bool(json_loads(json_dumps(value)) == value)  # type: ignore[no-untyped-call]
    except Exception:
        return False


#: The request attribute of a run that claimed its task (see run_once.py).
RUN_ATTR = "dynachord_run"

#: Most ids in one batch-get call (the service's MAX_BATCH_IDS default).
BATCH_IDS = 1000


class DynachordBackend(BaseBackend):
    """A Celery result backend on dynachord's HTTP API.

    Options go in ``result_backend_transport_options`` (see
    :class:`~dynachord_celery.client.ClientOptions`), for example
    ``{"region": "eu-west-1", "max_retries": 8}``.
    """

    supports_native_join = True
    supports_autoexpire = True
    supports_result_compression = True
    persistent = True

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, url=url, **kwargs)
        if not url:
            raise ImproperlyConfigured("dynachord needs the service's URL: result_backend = 'dynachord+https://<host>'")
        #: Results (and arguments JSON cannot hold) are stored encoded by the
        #: app's serializer, and compressed, as opaque payloads.
        self.opaque = self.serializer != "json" or bool(self.compression)
        raw = app.conf.get("result_backend_transport_options") or {}
        try:
            self.client = Client(url, ClientOptions.from_mapping(raw))
        except ValueError as exc:
            raise ImproperlyConfigured(str(exc)) from exc
        self.url = self.client.endpoint

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        # For result_backend_always_retry: the client already retried these.
        return isinstance(exc, DynachordUnavailable)

    # -- tasks ---------------------------------------------------------------

    def _expires_in(self) -> int | None:
        return None if not self.expires else max(1, int(self.expires))

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        body = self._store_body(task_id, result, state, traceback, request)
        run = getattr(request, RUN_ATTR, None) if request is not None else None
        if run is not None and state not in states.READY_STATES:
            # A run that claimed the task (run_once): what it stores before
            # it is done keeps (and renews) its claim.
            run.store(body, state)
            return result
        try:
            self.client.put_task(task_id, body)
        except DynachordError as exc:
            if "chord" not in body or exc.code not in REFUSED_CHORD_CODES:
                raise
            self._refuse_chord(task_id, body, exc)
        return result

    def _store_body(
        self, task_id: str, result: Any, state: str, traceback: str | None = None, request: Any = None
    ) -> dict[str, Any]:
        """The store's body: Celery's task meta (extended with the request's
        fields when ``result_extended``), the part's chord, the expiry."""
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        body = {k: meta[k] for k in META_FIELDS if k in meta}
        if request is not None:
            slot = _slot_of(request)
            if getattr(request, "group", None) and slot is not None:
                body["group_index"] = slot
            chord = self._chord_of(request, state)
            if chord is not None:
                body["chord"] = chord
        body["task_id"] = task_id
        expires_in = self._expires_in()
        if expires_in is not None:
            body["expires_in"] = expires_in
        if self.opaque:
            # Exceptions stay JSON (see encode_result); arguments too when
            # JSON holds them, so a redrive can send them again.
            if "result" in body and state not in self.EXCEPTION_STATES:
                body["result"] = self.to_opaque(body["result"])
            for key in ("args", "kwargs"):
                if key in body and not _json_holds(body[key]):
                    body[key] = self.to_opaque(body[key])
        return body

    def encode_result(self, result: Any, state: str) -> Any:
        """As Celery's, except that an exception is kept in Celery's JSON form
        (``exc_type``, ``exc_message``, ``exc_module``) whatever the
        serializer: chord-join reads a failed part's exception to fail its
        chord, and every reader turns it back into the exception."""
        if state in self.EXCEPTION_STATES and isinstance(result, Exception):
            return self.prepare_exception(result, "json")
        return super().encode_result(result, state)

    def to_opaque(self, value: Any) -> dict[str, Any]:
        """``value`` encoded by the app's result serializer (and compressed
        with ``result_compression``), as the service stores it: its content
        type and encoding kept, as Celery's key-value backends keep them."""
        content_type, content_encoding, payload = self._encode(value)
        if self.compression:
            payload = compress_payload(payload, self.compression)
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        data = base64.b64encode(payload).decode("ascii")
        return {ENCODED: {"content_type": content_type, "content_encoding": content_encoding, "data": data}}

    def from_opaque(self, value: Any) -> Any:
        """The value an opaque payload holds (anything else as it is),
        decoded only if its content type is one the app accepts
        (``result_accept_content``)."""
        if not _is_opaque(value):
            return value
        spec = value[ENCODED]
        payload = decompress_payload(base64.b64decode(spec["data"]))
        return loads(  # type: ignore[no-untyped-call]
            payload, content_type=spec["content_type"], content_encoding=spec["content_encoding"], accept=self.accept
        )

    def from_opaque_results(self, value: Any) -> Any:
        """What the service sends a callback as its first argument, decoded:
        one result (the processing cache's), or a chord's results; the same
        object when nothing in it is opaque."""
        if _is_opaque(value):
            return self.from_opaque(value)
        if isinstance(value, list) and any(_is_opaque(item) for item in value):
            return [self.from_opaque(item) for item in value]
        return value

    def mark_as_failure(
        self,
        task_id: str,
        exc: Any,
        traceback: str | None = None,
        request: Any = None,
        store_result: bool = True,
        call_errbacks: bool = True,
        state: str = states.FAILURE,
    ) -> None:
        """As Celery's, which stores the failure for each task of the rest
        of the failed task's chain, and also for the tasks of a group in it:
        Celery stores it under the group's own id only, so
        ``(a | fail | group(b, c)).get()`` waits for ``b`` and ``c``, which
        never run, until it times out (Celery's issue #6437, xfail on
        Redis). Each such task now reads as failed with the exception, and
        one that is part of a chord reports its slot, so the chord fails
        instead of waiting for it."""
        super().mark_as_failure(
            task_id, exc, traceback=traceback, request=request, store_result=store_result,
            call_errbacks=call_errbacks, state=state,
        )  # fmt: skip
        if not store_result or request is None or state not in states.PROPAGATE_STATES:
            return
        rest = getattr(request, "chain", None)
        for elem in _signatures(rest if isinstance(rest, list) else None):
            if elem.get("task") != "celery.group":
                continue
            for sig in _nested(elem)[1:]:
                options = sig.get("options") or {}
                if not options.get("task_id") or sig.get("task") in ("celery.group", "celery.chain"):
                    continue
                # As Celery builds each chain element's context.
                ctx = Context(sig)
                ctx.update(options)
                ctx.id, ctx.group = options.get("task_id"), options.get("group_id")
                self.store_result(ctx.id, exc, state, traceback=traceback, request=ctx)

    def _refuse_chord(self, task_id: str, body: dict[str, Any], exc: DynachordError) -> None:
        """The service refused a part's chord (a body it cannot send, a queue
        the tenant may not use, a callback too large): keep the part's own
        result, and fail the chord's body with a ChordError saying why, so a
        caller waiting on it gets an answer instead of waiting for ever."""
        callback = body.pop("chord")["callback"]
        self.client.put_task(task_id, body)
        logger.error("dynachord refused the chord of %s: %s", task_id, exc.message)
        error = ChordError(f"chord refused by dynachord: {exc.message}")
        meta = {
            "status": states.FAILURE,
            "result": self.encode_result(error, states.FAILURE),
            "traceback": None,
            "children": [],
        }
        for sig in _nested(callback):
            sig_id = (sig.get("options") or {}).get("task_id")
            if sig_id:
                self.client.put_task(sig_id, dict(meta, task_id=sig_id))

    def _chord_of(self, request: Any, state: str) -> dict[str, Any] | None:
        """The chord a header part reports on reaching a ready state: its size
        and the callback, routed as Celery would route it."""
        callback = getattr(request, "chord", None)
        if not callback or state not in states.READY_STATES:
            return None
        if not getattr(request, "group", None) or _slot_of(request) is None:
            raise ImproperlyConfigured(
                f"task {request.id} is a chord part without group_id/group_index; "
                "dynachord joins chords of flat groups sent by Celery 5.1 or later"
            )
        size = callback.get("chord_size")
        if size is None:
            raise ImproperlyConfigured(f"task {request.id}'s chord has no chord_size (Celery 5.1 or later sets it)")
        callback = copy.deepcopy(dict(callback))
        # Each part's slot is its own to report; the service needs only the shape.
        (callback.get("options") or {}).pop(HEADER_SLOTS, None)
        self._route(callback)
        return {"size": size, "callback": callback}

    def _route(self, sig: dict[str, Any], sent_by_service: bool = True) -> None:
        """Names the queue of a signature from this app's routes (the service
        falls back to its default queue otherwise), and likewise for the
        signatures in it. What the service itself sends (the body, a chain's
        first task, errbacks) gets the queue's name on SQS, with the SQS
        transport's ``queue_name_prefix``; what the worker sends on (links,
        the rest of a chain) keeps its logical name, which kombu prefixes."""
        options = sig.get("options")
        if not isinstance(options, dict):
            options = sig["options"] = {}
        if not options.get("queue"):
            route = self.app.amqp.router.route(
                {k: v for k, v in options.items() if k in ("queue", "exchange", "routing_key")},
                sig.get("task"),
            )
            queue = route.get("queue")
            name = getattr(queue, "name", queue)
            if name:
                options["queue"] = name
        if sent_by_service and options.get("queue"):
            options["queue"] = self._queue_name_prefix() + str(options["queue"])
        for key, by_service in (("link", False), ("link_error", sent_by_service)):
            linked = options.get(key)
            for child in linked if isinstance(linked, list) else [linked] if linked else []:
                if isinstance(child, dict) and child.get("task"):
                    self._route(child, by_service)
        # A chain is sent as its first task, and the worker sends the rest;
        # the service sends each task of a group or of a chord's header.
        for i, child in enumerate(_tasks_of(sig)):
            self._route(child, sent_by_service and (i == 0 or sig.get("task") != "celery.chain"))
        # A chord's body goes out when its header is joined, routed then by
        # the parts that report it: here it only gets its queue's name.
        for body in _body_of(sig):
            self._route(body, False)

    def _queue_name_prefix(self) -> str:
        """The SQS transport's ``queue_name_prefix`` (kombu puts it before
        every queue name), when the broker is SQS."""
        broker = str(self.app.conf.broker_url or "")
        if not broker.startswith("sqs"):
            return ""
        options = self.app.conf.broker_transport_options or {}
        return str(options.get("queue_name_prefix") or "")

    def _decode(self, meta: dict[str, Any]) -> dict[str, Any]:
        for key in ("result", "args", "kwargs"):
            if _is_opaque(meta.get(key)):
                meta[key] = self.from_opaque(meta[key])
        return dict(self.meta_from_decoded(meta))

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        return self._decode(self.client.get_task(task_id))

    def task_result_exists(self, task_id: str) -> bool:
        return bool(self._get_task_meta_for(task_id)["status"] != states.PENDING)

    def _forget(self, task_id: str) -> None:
        self.client.forget(task_id)

    def wait_for_pending(
        self,
        result: Any,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_message: Any = None,
        on_interval: Any = None,
        callback: Any = None,
        propagate: bool = True,
    ) -> Any:
        """As Celery's, plus ``on_message``: the task's states (progress
        included) are handed to it as they change, while the client waits."""
        self._ensure_not_eager()
        meta = self.wait_for(result.id, timeout=timeout, on_interval=on_interval, on_message=on_message)
        result._maybe_set_cache(meta)
        return result.maybe_throw(propagate=propagate, callback=callback)

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Any = None,
        on_message: Any = None,
    ) -> dict[str, Any]:
        """Waits on the server (long-poll), not by polling from here. With
        ``on_message``, each long-poll is short (a second) so states that are
        not ready yet (``PROGRESS``, ...) reach it as they change."""
        self._ensure_not_eager()
        cached = self._cache.get(task_id)
        if cached is not None and cached["status"] in states.READY_STATES:
            if on_message is not None:
                on_message(dict(cached))
            return dict(cached)
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[Any, Any] | None = None
        follows = _does_something(on_interval)
        while True:
            left = self.client.options.max_wait if deadline is None else deadline - time.monotonic()
            if on_message is not None or follows:
                # States reach on_message as they change, and a parent's
                # failure is seen within a second, as Celery's drainer sees it.
                left = min(left, 1.0)
            try:
                meta = self._decode(self.client.get_task(task_id, wait=max(0.0, left), deadline=deadline))
            except DynachordTimeout as exc:
                raise self.TimeoutError("The operation timed out.") from exc
            if on_message is not None and meta["status"] != states.PENDING:
                state = (meta["status"], meta.get("result"))
                if state != seen:
                    seen = state
                    on_message(dict(meta))
            if meta["status"] in states.READY_STATES:
                if follows and meta["status"] in states.PROPAGATE_STATES:
                    # As Celery's drainer, once more after the wait that made
                    # the result ready: a failed parent (a chord's header
                    # task, a chain's) raises its own exception first.
                    on_interval()
                if meta["status"] == states.SUCCESS:
                    self._cache[task_id] = meta
                return meta
            if on_interval:
                on_interval()
            if deadline is not None and time.monotonic() >= deadline:
                raise self.TimeoutError("The operation timed out.")

    def get_many(
        self,
        task_ids: Any,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_message: Any = None,
        on_interval: Any = None,
        max_iterations: int | None = None,
        READY_STATES: frozenset[str] = states.READY_STATES,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yields ``(task_id, meta)`` as tasks become ready: batch-get calls of
        up to 1,000 ids, each long-polling on the server."""
        ids = list(dict.fromkeys(task_ids))
        waiting = []
        for task_id in ids:
            cached = self._cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                yield task_id, cached
            else:
                waiting.append(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        iterations = 0
        while waiting:
            left = self.client.options.max_wait if deadline is None else max(0.0, deadline - time.monotonic())
            still = []
            for start in range(0, len(waiting), BATCH_IDS):
                chunk = waiting[start : start + BATCH_IDS]
                # Only the first chunk waits: later ones are read right after it.
                try:
                    metas = self.client.batch_get(chunk, wait=left if start == 0 else 0.0, deadline=deadline)
                except DynachordTimeout as exc:
                    raise self.TimeoutError(f"Operation timed out ({timeout})") from exc
                for task_id, raw in zip(chunk, metas):
                    if raw.get("status") in READY_STATES:
                        meta = self._decode(raw)
                        self._cache[task_id] = meta
                        if on_message is not None:
                            on_message(meta)
                        yield task_id, meta
                    else:
                        still.append(task_id)
            waiting = still
            if not waiting:
                break
            if on_interval:
                on_interval()
            if deadline is not None and time.monotonic() >= deadline:
                raise self.TimeoutError(f"Operation timed out ({timeout})")
            iterations += 1
            if max_iterations and iterations >= max_iterations:
                break

    # -- groups ----------------------------------------------------------------

    def _save_group(self, group_id: str, result: Any) -> Any:
        self.client.save_group(group_id, result.as_tuple(), self._expires_in())
        return result

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        meta = self.client.get_group(group_id)
        if meta is None:
            return None
        meta["result"] = result_from_tuple(meta["result"], self.app)
        return meta

    def _delete_group(self, group_id: str) -> None:
        self.client.delete_group(group_id)

    # -- chords: joined on the server -----------------------------------------

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        """Called by ``chord.run`` after the header is frozen, before any part
        is sent: records the header's size on the callback signature, which
        every part's message carries (``request.chord``), so each part can
        report the chord when it stores its result. Nothing else: the service
        joins and sends the callback (no chord_unlock task)."""
        self.ensure_chords_allowed()
        _group_id, results = header_result_args
        layout = _header_layout(results) if isinstance(results, (list, tuple)) else None
        if layout is None:
            body["chord_size"] = len(results)
            return
        shape, slots = layout
        if len(json_dumps(slots)) > MAX_HEADER_SLOTS_BYTES:  # type: ignore[no-untyped-call]
            raise ChordError(
                f"a chord header whose chains end in groups is joined by each part's task id, which every part's "
                f"message carries: {len(slots)} parts are more than {MAX_HEADER_SLOTS_BYTES} bytes of ids; "
                "make the inner groups chords of their own, or the header one flat group"
            )
        body["chord_size"] = len(slots)
        body.options[HEADER_SHAPE] = shape
        body.options[HEADER_SLOTS] = slots

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        """Not needed: the size travels with each part (see :meth:`apply_chord`);
        Celery calls this only before sending the last part."""

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        """The part's store already counted it; the service joins the chord.

        A part with ``ignore_result=True`` stored nothing, but Celery's Redis
        backend still joins its result into the chord: store it here, with
        its chord, so the service counts it too."""
        if getattr(request, "ignore_result", False) and state in states.READY_STATES:
            self._store_result(request.id, result, state, request=request)

    def add_to_chord(self, chord_id: str, result: Any) -> None:
        raise NotImplementedError(
            "dynachord joins chords of a fixed size; Task.add_to_chord and replacing a chord part "
            "with a group are not supported"
        )

    def chord_status(self, group_id: str, failed_ids: bool = False) -> dict[str, Any] | None:
        """The server's view of a chord, from one request however many parts
        it has: size, state, callback_id, and its parts counted by state
        (``succeeded``, ``failed``, ``pending``); with ``failed_ids``, the
        failed parts' task ids. ``None`` before its first part is counted.

        Takes a chord's id (its header group's id): ``result.parent.id`` of
        ``chord(header)(body)``, or the group's ``GroupResult.id``."""
        return self.client.chord(group_id, failed_ids=failed_ids)

    def redrive_chord(self, group_id: str, queue: str | None = None) -> dict[str, Any]:
        """Runs a chord's failed parts again, as Step Functions' redrive does:
        the parts that failed are sent again with their task ids and
        arguments, the others keep their results, and once they have
        reported the chord joins again, once, and its callback runs with
        every result (``AsyncResult(callback_id).get()`` waits for it).

        For a chord that failed, or called back with tolerated failures;
        needs ``result_extended=True`` (the parts' arguments are read from
        their results). Each part goes back to the queue it ran from, or to
        ``queue``. Takes the chord's id, as :meth:`chord_status` does."""
        return self.client.redrive_chord(group_id, queue=queue, queue_prefix=self._queue_name_prefix() or None)

    def as_uri(self, include_password: bool = False) -> str:
        return f"dynachord+{self.client.endpoint}"

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None) -> Any:
        return super().__reduce__(args, dict(kwargs or {}, url=self.client.endpoint))


#: The first argument of a chord callback whose results were too large for
#: a queue message: the service stored them as a result of their own.
RESULTS_REF = "dynachord_ref"

#: The ``origin`` header of every message the service's chord-join sends
#: (chord callbacks and errbacks, the processing cache's callbacks).
SERVICE_ORIGIN = "dynachord@chord-join"


def is_failure(value: Any) -> bool:
    """Whether a value in a chord callback's results is a failed part's
    exception (a chord whose body tolerates failed parts, with
    ``.set(tolerated_failures=...)``, gets it in that part's slot) rather
    than a result: ``{"exc_type", "exc_message", "exc_module"}``, as Celery's
    backends store an exception."""
    return isinstance(value, dict) and isinstance(value.get("exc_type"), str) and "exc_message" in value


def sent_by_the_service(task: Any) -> bool:
    """Whether the message ``task`` runs from was sent by the service's
    chord-join: only those may carry a reference for the worker to resolve.
    A task that any client sends with ``{"dynachord_ref": ...}`` as an
    argument runs with that argument as it is."""
    return getattr(getattr(task, "request", None), "origin", None) == SERVICE_ORIGIN


def _resolve_chord_results(sender: Any = None, task: Any = None, args: Any = None, **_: Any) -> None:
    """Before a task runs (``task_prerun``): when the service sent it and its
    first argument is the service's reference to a chord's results, puts the
    results in its place, so the callback receives the real list; results
    stored encoded by the app's serializer (``result_serializer`` other than
    JSON, ``result_compression``) are decoded."""
    if not isinstance(args, list) or not args or not sent_by_the_service(task):
        return
    first = args[0]
    backend = getattr(task, "backend", None)
    if isinstance(first, dict) and set(first) == {RESULTS_REF} and isinstance(first[RESULTS_REF], dict):
        if not isinstance(backend, DynachordBackend):
            logger.warning("dynachord: %s got chord results by reference, but its backend is not dynachord", task)
            return
        ref_id = str(first[RESULTS_REF].get("task_id"))
        meta = backend.client.get_task(ref_id)
        if meta.get("status") != states.SUCCESS:
            raise ChordError(f"the chord's results ({ref_id}) are no longer stored: {meta.get('status')}")
        first = meta.get("result")
    # Results stored encoded by the app's serializer are decoded here.
    if isinstance(backend, DynachordBackend):
        first = backend.from_opaque_results(first)
    if first is not args[0]:
        # Its own meta keeps the reference, not the results, which may be
        # far larger than a store request.
        _run_with(task, args, [first, *args[1:]])


def _run_with(task: Any, args: list[Any], new: list[Any]) -> None:
    """In a ``task_prerun`` hook: the task runs with ``new`` in place of
    ``args`` (the list it is then called with), while its own meta
    (``result_extended``) keeps the args as they were sent."""
    request = getattr(task, "request", None)
    if request is not None and getattr(request, "args", None) is args:
        request.args = list(args)
    args[:] = new


signals.task_prerun.connect(_resolve_chord_results, weak=False, dispatch_uid="dynachord-chord-results")

#: The message header on each errback the service sends for a failed chord:
#: the task whose failure it reports (``id``, ``task``, ``args``,
#: ``kwargs``, ``errbacks``: the callback, or a task of a group body),
#: whether the errback is ``immutable``, and ``exc``, the exception (the
#: ChordError, or for a group body's task the failed part's own) as Celery
#: serializes exceptions.
CHORD_ERROR_HEADER = "dynachord_chord_error"


def _is_new_style(task: Any, own_args: list[Any], kwargs: Mapping[str, Any]) -> bool:
    """Celery's rule for an errback (``BaseBackend._call_task_errbacks``): a
    task made with ``@app.task`` whose function takes more than one argument
    besides those its signature already holds is called as
    ``errback(request, exc, traceback)``; a ``bind=True`` task, or one that
    takes a single argument, is sent the failed task's id instead."""
    header = getattr(task, "__header__", None)
    if header is None or isinstance(header, functools.partial):
        return False
    if own_args or kwargs:
        try:
            return bool(arity_greater(functools.partial(header, *own_args, **kwargs), 1))
        except (TypeError, ValueError):
            pass
    return bool(arity_greater(header, 1))


def _call_new_style_errback(
    sender: Any = None, task: Any = None, args: Any = None, kwargs: Any = None, **_: Any
) -> None:
    """Before a task runs (``task_prerun``): when the service sent it as an
    errback of a failed chord and it is a new-style errback, calls it as
    Celery's own backends do, with the failed callback's request, the
    exception and no traceback, followed by its own arguments. The service
    sends every errback as Celery sends an old-style one (the failed task's
    id first, unless immutable), so old-style errbacks run untouched."""
    request = getattr(task, "request", None)
    info = getattr(request, CHORD_ERROR_HEADER, None)
    if not isinstance(info, dict) or not isinstance(args, list):
        return
    if info.get("immutable"):
        # Either way Celery calls an immutable errback with its own
        # arguments only, which is how the service sent it.
        return
    own = list(args[1:])
    if not _is_new_style(task, own, kwargs or {}):
        return
    failed = Context(
        {
            "id": info.get("id"),
            "task": info.get("task") or "unknown",
            "args": info.get("args") or [],
            "kwargs": info.get("kwargs") or {},
            "errbacks": info.get("errbacks") or [],
            "delivery_info": {},
        }
    )
    exc = task.backend.exception_to_python(info.get("exc"))
    # Its own meta keeps the args as sent, which are JSON; the request and
    # the exception are not.
    _run_with(task, args, [failed, exc, None, *own])


signals.task_prerun.connect(_call_new_style_errback, weak=False, dispatch_uid="dynachord-chord-errbacks")

__all__ = ["DynachordBackend", "DynachordError", "DynachordTimeout", "DynachordUnavailable"]
