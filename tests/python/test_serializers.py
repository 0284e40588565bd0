"""Results under any of Celery's serializers, compressed or not, with real
`celery worker`s on the local stack: a task, a group and a chord each
round-trip a value JSON cannot hold, exactly as the serializer itself
gives it back."""

import os
import uuid

import pytest
from worker_process import celery_worker, use_local_stack

RUN = uuid.uuid4().hex[:10]
use_local_stack(RUN)

from celery import Celery, chord, group  # noqa: E402
from e2e_tasks import app, rich_value  # noqa: E402
from kombu.serialization import dumps, loads  # noqa: E402

TIMEOUT = 60


def round_trip(value, serializer):
    """What the serializer itself gives back for `value`."""
    content_type, encoding, payload = dumps(value, serializer=serializer)
    return loads(payload, content_type=content_type, content_encoding=encoding, force=True)


def client(serializer, compression, queue):
    """The caller's app: the e2e app's broker and backend, this serializer."""
    caller = Celery(f"caller-{serializer}", set_as_current=False)
    caller.conf.update(
        broker_url=app.conf.broker_url,
        broker_transport_options=app.conf.broker_transport_options,
        result_backend=app.conf.result_backend,
        result_backend_transport_options=app.conf.result_backend_transport_options,
        result_extended=True,
        task_default_queue=queue,
        result_serializer=serializer,
        result_accept_content=[serializer, "json"],
        result_compression=compression,
    )
    return caller


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("serializer", ["pickle", "msgpack", "yaml"])
def test_a_task_a_group_and_a_chord_round_trip_under_the_serializer(request, serializer, compression):
    queue = f"ser-{serializer}-{compression or 'raw'}-{RUN}"
    env = dict(os.environ, E2E_QUEUE=queue, E2E_RESULT_SERIALIZER=serializer)
    if compression:
        env["E2E_RESULT_COMPRESSION"] = compression
    caller = client(serializer, compression, queue)
    expected = round_trip(rich_value(serializer), serializer)
    with celery_worker(request, f"ser-{serializer}-{RUN}", env, concurrency=2):
        rich = caller.signature("e2e_tasks.rich", args=(serializer,))
        single = rich.delay()
        assert single.get(timeout=TIMEOUT) == expected
        stored = caller.backend.client.get_task(single.id)["result"]
        assert set(stored) == {"dynachord_encoded"}, "stored as the serializer's opaque payload"
        assert stored["dynachord_encoded"]["content_type"] == caller.backend.content_type
        assert group(rich.clone() for _ in range(3))().get(timeout=TIMEOUT) == [expected] * 3
        collect = caller.signature("e2e_tasks.collect", args=("tag",))
        got = chord([rich.clone() for _ in range(3)])(collect).get(timeout=TIMEOUT)
        assert got == round_trip({"tag": "tag", "values": [expected] * 3}, serializer)
    caller.close()
