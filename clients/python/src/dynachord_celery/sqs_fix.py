"""A fix for kombu's SQS transport: a worker that survives an SQS server error.

kombu 5.7's asynchronous SQS client answers a ReceiveMessage that got a 5xx,
a 408/504 or a connection error (curl's 599) with an empty *list*, meant to
read as "no messages"; the channel then calls ``.get("Messages")`` on it, and
the worker stops with ``Unrecoverable error: AttributeError("'list' object has
no attribute 'get'")``. One 500 from SQS is enough. Nothing is lost (the
messages stay on the queue), but the worker is gone until restarted.

This has nothing to do with the result backend; it is here because a Celery
app on the SQS broker, which is what dynachord is for, meets it. Call
:func:`survive_sqs_server_errors` once where the app is defined::

    from dynachord_celery.sqs_fix import survive_sqs_server_errors
    survive_sqs_server_errors()

It wraps one method so that the empty list reads as no messages; every
other answer goes to kombu's own method unchanged, so it is harmless on a
kombu without the bug. Without kombu's SQS transport it does nothing.
"""

from __future__ import annotations

from typing import Any


def survive_sqs_server_errors() -> bool:
    """Patches kombu's SQS channel once; returns whether a patch is in place."""
    try:
        from kombu.transport.SQS import Channel
    except ImportError:  # kombu without its SQS extra: nothing to fix
        return False
    original: Any = Channel._on_messages_ready
    if getattr(original, "_dynachord_fixed", False):
        return True

    def _on_messages_ready(self: Any, queue: Any, qname: str, messages: Any) -> Any:
        if not isinstance(messages, dict):
            # kombu's error path (_on_list_ready) answers [] for a server
            # error: no messages this time; the next poll is scheduled as
            # after an empty receive.
            return 0
        return original(self, queue, qname, messages)

    _on_messages_ready._dynachord_fixed = True  # type: ignore[attr-defined]
    setattr(Channel, "_on_messages_ready", _on_messages_ready)  # noqa: B010 (mypy refuses assigning to a method)
    return True
