"""What chord-join puts on SQS is a message kombu and Celery accept.

Runs against the local stack (./dev test starts it): stores a chord's parts
over HTTP, then reads the callback from moto's SQS with kombu's own SQS
transport and hands it to Celery's worker-side Request, as a worker would.
"""

import json
import os
import urllib.request
import uuid

import pytest
from celery import Celery
from celery.worker.request import Request
from endpoints import url
from kombu import Connection

SQS_ENDPOINT = os.environ.get("SQS_ENDPOINT", "http://127.0.0.1:5000")


def put(path, body):
    req = urllib.request.Request(url("PUT", path), data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


@pytest.fixture(autouse=True)
def local_aws(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", SQS_ENDPOINT)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_kombu_and_celery_accept_the_chord_callback():
    prefix = uuid.uuid4().hex[:12]
    queue, gid, cb = f"{prefix}-q", f"{prefix}-g", f"{prefix}-cb"
    callback = {
        "task": "proj.tasks.tsum",
        "args": [10],
        "kwargs": {"scale": 2},
        "options": {"task_id": cb, "queue": queue, "reply_to": "oid-1", "group_id": gid},
        "subtask_type": None,
        "immutable": False,
    }
    app = Celery("wire", broker="sqs://local:local@", set_as_current=False)
    app.conf.broker_transport_options = {"region": "us-east-1"}

    @app.task(name="proj.tasks.tsum")
    def tsum(results, extra, scale=1):
        return (sum(results) + extra) * scale

    with Connection("sqs://local:local@", transport_options={"region": "us-east-1"}) as conn:
        simple = conn.SimpleQueue(queue)  # declares the queue before the callback is sent
        for i in range(3):
            put(
                f"/v1/tasks/{prefix}-p{i}",
                {
                    "status": "SUCCESS",
                    "result": i * 100,
                    "group_id": gid,
                    "group_index": i,
                    "chord": {"size": 3, "callback": callback},
                },
            )
        message = simple.get(block=True, timeout=60)
        try:
            assert message.headers["task"] == "proj.tasks.tsum"
            assert message.headers["id"] == cb
            assert message.headers["group"] == gid
            assert message.properties["reply_to"] == "oid-1"
            args, kwargs, embed = message.decode()
            assert args == [[0, 100, 200], 10]
            assert kwargs == {"scale": 2}
            assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

            # The worker's own view of the message.
            request = Request(message, app=app, task=app.tasks["proj.tasks.tsum"])
            assert request.id == cb
            assert request.task_name == "proj.tasks.tsum"
            assert request.args == [[0, 100, 200], 10]
            assert request.kwargs == {"scale": 2}
            assert request.reply_to == "oid-1"
            # And running it as the worker would gives the joined result.
            assert tsum(*request.args, **request.kwargs) == 620
        finally:
            message.ack()
        with pytest.raises(simple.Empty):
            simple.get(block=True, timeout=3)
        simple.close()
