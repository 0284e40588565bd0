"""A task runs once per id, even when its message arrives twice: dynachord's
run-once guard (dynachord_celery.run_once) with real `celery worker`s on
the local stack (SQS on moto). A duplicate here is what SQS makes: the same
message body sent twice (two SendMessage calls), taken from a message
Celery (or chord-join) really sent.
"""

import os
import re
import time
import uuid

import boto3
import pytest
from worker_process import celery_worker, use_local_stack

RUN = uuid.uuid4().hex[:10]
use_local_stack(RUN)

from celery import chord  # noqa: E402
from celery.result import AsyncResult  # noqa: E402
from e2e_tasks import add, app, collect_once, once, replaced, replaced_once  # noqa: E402

TIMEOUT = 60
#: The queues' visibility timeout: a message a dead worker held comes back
#: after it.
VISIBILITY = 4


def sqs():
    return boto3.client("sqs", endpoint_url=os.environ["AWS_ENDPOINT_URL_SQS"], region_name="us-east-1")


def make_queue(name: str) -> str:
    """A queue of this run's own, made before kombu would make it (with
    its 30 minutes' visibility timeout)."""
    return sqs().create_queue(QueueName=name, Attributes={"VisibilityTimeout": str(VISIBILITY)})["QueueUrl"]


def wait_until(condition, what: str, timeout: float = TIMEOUT, context=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"gave up waiting for {what}\n{context()}"
        time.sleep(0.2)


def take_one(queue_url: str) -> dict:
    """The one message on a queue nobody consumes, as SQS holds it."""

    def receive():
        got = sqs().receive_message(QueueUrl=queue_url, MaxNumberOfMessages=1, WaitTimeSeconds=1)
        return got.get("Messages")

    message = wait_until(receive, "a message on the capture queue")[0]
    sqs().delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return message


def send_copies(queue_url: str, message: dict, copies: int) -> None:
    for _ in range(copies):
        sqs().send_message(QueueUrl=queue_url, MessageBody=message["Body"])


def queue_is_empty(queue_url: str) -> bool:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs().get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return all(attributes.get(name) == "0" for name in names)


def lines(marks, key: str) -> list[str]:
    path = marks / key
    return path.read_text().split() if path.exists() else []


def starts(marks, key: str) -> int:
    return lines(marks, key).count("start")


@pytest.fixture(scope="module")
def queues():
    """The worker's queue and a capture queue no worker reads."""
    work, capture = f"once-{RUN}", f"once-capture-{RUN}"
    return {"work": (work, make_queue(work)), "capture": (capture, make_queue(capture))}


@pytest.fixture(scope="module")
def worker(request, queues):
    env = dict(os.environ, E2E_QUEUE=queues["work"][0])
    with celery_worker(request, f"once-{RUN}", env) as w:
        wait_until(lambda: "ready." in w.text(), "the worker to start", context=w.text)
        yield w


def captured(queues, sig, task_id: str) -> dict:
    """The message Celery sends for ``sig``, taken off the capture queue."""
    sig.apply_async(task_id=task_id, queue=queues["capture"][0])
    return take_one(queues["capture"][1])


def test_two_copies_delivered_at_once_run_the_task_once(worker, queues, tmp_path):
    task_id = f"dup-{uuid.uuid4().hex}"
    message = captured(queues, once.s(str(tmp_path), "a", 2), task_id)
    send_copies(queues["work"][1], message, 2)
    result = AsyncResult(task_id, app=app).get(timeout=TIMEOUT)
    assert lines(tmp_path, "a") == ["start", result, "done", result]
    # The second copy found the first's live claim: it came back after the
    # lease, found the result, and was acknowledged without running.
    wait_until(lambda: queue_is_empty(queues["work"][1]), "the copies to be acknowledged", context=worker.text)
    assert re.search(rf"{task_id}'s message comes back in", worker.text()), worker.text()[-3000:]
    assert starts(tmp_path, "a") == 1
    assert AsyncResult(task_id, app=app).get(timeout=TIMEOUT) == result


def test_a_copy_delivered_after_the_run_finished_does_not_run_it_again(worker, queues, tmp_path):
    task_id = f"late-{uuid.uuid4().hex}"
    message = captured(queues, once.s(str(tmp_path), "b", 0), task_id)
    send_copies(queues["work"][1], message, 1)
    result = AsyncResult(task_id, app=app).get(timeout=TIMEOUT)
    send_copies(queues["work"][1], message, 1)
    wait_until(lambda: queue_is_empty(queues["work"][1]), "the copy to be acknowledged", context=worker.text)
    wait_until(lambda: re.search(rf"\[{task_id}\] task {task_id} is already SUCCESS", worker.text()), "its log")
    assert starts(tmp_path, "b") == 1
    assert AsyncResult(task_id, app=app).get(timeout=TIMEOUT) == result


def test_a_chord_callback_sent_twice_runs_once(worker, queues, tmp_path):
    callback = collect_once.s(str(tmp_path), "c").set(queue=queues["capture"][0])
    work = queues["work"][0]
    result = chord([add.s(1, 1).set(queue=work), add.s(2, 2).set(queue=work)])(callback)
    message = take_one(queues["capture"][1])
    send_copies(queues["work"][1], message, 2)
    got = result.get(timeout=TIMEOUT)
    assert got["values"] == [2, 4]
    wait_until(lambda: queue_is_empty(queues["work"][1]), "the copies to be acknowledged", context=worker.text)
    assert lines(tmp_path, "c") == ["start", got["run"]]


def test_a_task_whose_worker_was_killed_runs_on_the_next_delivery_after_its_lease(request, tmp_path):
    """The first worker dies while it runs the task (its claim is no longer
    renewed, its message not deleted): the message comes back after SQS's
    visibility timeout, and a second worker runs the task once the claim's
    lease has passed."""
    name = f"once-kill-{RUN}"
    url = make_queue(name)
    env = dict(os.environ, E2E_QUEUE=name)
    task_id = f"kill-{uuid.uuid4().hex}"
    with celery_worker(request, f"{name}-1", env) as first:
        once.apply_async((str(tmp_path), "k", 600), task_id=task_id, queue=name)
        wait_until(lambda: starts(tmp_path, "k") == 1, "the first run to start", context=first.text)
        claimed = app.backend.client.get_task(task_id)
        assert claimed["status"] == "STARTED", claimed
        first.kill()
    with celery_worker(request, f"{name}-2", env) as second:
        result = AsyncResult(task_id, app=app).get(timeout=TIMEOUT)
        assert lines(tmp_path, "k") == ["start", lines(tmp_path, "k")[1], "start", result, "done", result]
        wait_until(lambda: queue_is_empty(url), "the message to be acknowledged", context=second.text)


@pytest.mark.parametrize("kind", ["task", "group", "chord"])
def test_a_task_under_the_guard_that_replaces_itself_gives_its_replacements_result(worker, queues, kind):
    """Task.replace hands the task's id to the replacement: the guard gives
    its claim up first, so the replacement (a callback the service sends,
    under the guard, for a group or a chord) can claim the same id."""
    expected = {"task": 4, "group": [4, 5], "chord": 9}[kind]
    result = replaced_once.s(3, kind).apply_async(queue=queues["work"][0])
    assert result.get(timeout=TIMEOUT) == expected


def test_a_chord_callback_that_replaces_itself_with_a_group_gives_the_groups_results(worker, queues):
    """Celery's test_single_task_header: the callback, under the guard
    because the service sends it, replaces itself with a group, which
    becomes a chord whose own callback has the same id."""
    work = queues["work"][0]
    result = chord([add.s(2, 5).set(queue=work)])(replaced.s("a group of each").set(queue=work))
    assert result.get(timeout=TIMEOUT) == [8]
