"""The Celery app of the run-once bench (bench/run_once/bench.py): the
same task with and without dynachord's run-once guard, with and without
task_track_started. The worker counts the service requests each task's run
makes (its claim, its renewals, its stores) and appends them to the file
BENCH_COUNTS names, one line `<task_id> <requests>` per run."""

import collections
import os

from celery import Celery, signals
from dynachord_celery import client as dynachord_client

app = Celery("run_once_bench")
app.conf.update(
    broker_url="sqs://local:local@",
    broker_transport_options={"region": "us-east-1", "polling_interval": 0.05, "wait_time_seconds": 1},
    result_backend="dynachord+" + os.environ.get("DYNACHORD_ENDPOINT", "http://127.0.0.1:9000"),
    task_default_queue=os.environ.get("BENCH_QUEUE", "run-once-bench"),
    worker_prefetch_multiplier=1,
)

_requests: collections.Counter = collections.Counter()
_request = dynachord_client.Client.request


def _counted(self, method, path, *args, **kwargs):
    if path.startswith("/v1/tasks/"):
        _requests[path.split("/")[3]] += 1
    return _request(self, method, path, *args, **kwargs)


dynachord_client.Client.request = _counted


@signals.task_postrun.connect
def _write_count(task_id=None, **_):
    with open(os.environ["BENCH_COUNTS"], "a") as out:
        out.write(f"{task_id} {_requests.pop(task_id, 0)}\n")


def work(x):
    return x


plain = app.task(work, name="bench.plain")
guarded = app.task(work, name="bench.guarded", run_once=True)
plain_tracked = app.task(work, name="bench.plain_tracked", track_started=True)
guarded_tracked = app.task(work, name="bench.guarded_tracked", run_once=True, track_started=True)
