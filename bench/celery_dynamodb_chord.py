"""Celery 5.7's own DynamoDB result backend joining a chord, for comparison.

Run by the bench (target/release/bench) in the same run, on the same DynamoDB
Local and SQS (moto): sets up a chord of N parts the way Celery's chord apply
does (header results stored, group saved, counter initialised, counter at
N-1), then times `on_chord_part_return` for the last part, which is where
Celery joins: counter increment, group restore, join of every result, the
callback published to SQS, clean-up. Prints one JSON line.
"""

import argparse
import json
import os
import time
import uuid
from types import SimpleNamespace

from celery import Celery, states
from celery.result import AsyncResult

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=1000)
args = parser.parse_args()

os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_ENDPOINT_URL_SQS", os.environ.get("SQS_ENDPOINT", "http://127.0.0.1:5000"))
host_port = os.environ.get("DYNAMODB_ENDPOINT", "http://127.0.0.1:8000").split("//", 1)[1]
host, port = host_port.split(":")

app = Celery(
    "bench",
    broker="sqs://local:local@",
    backend=f"dynamodb://local:local@{host}:{port}/celery_bench_results?read=50&write=50",
    set_as_current=True,
)
app.conf.broker_transport_options = {"region": "us-east-1"}
backend = app.backend

requests = {"n": 0, "ops": {}}


def count(event_name=None, **_):
    requests["n"] += 1
    op = event_name.rsplit(".", 1)[-1]
    requests["ops"][op] = requests["ops"].get(op, 0) + 1


backend.client.meta.events.register("before-call.dynamodb", count)

n = args.n
gid = str(uuid.uuid4())
tids = [str(uuid.uuid4()) for _ in range(n)]
queue = f"celery-bench-{uuid.uuid4().hex[:8]}"

# Header results, written in batches (setup, not timed). Keys as the backend
# makes them: str() of the bytes key.
table = backend.table_name
items = []
for i, tid in enumerate(tids):
    meta = backend._get_result_meta(result=i, state=states.SUCCESS, traceback=None, request=None)
    items.append(backend._prepare_put_request(str(backend.get_key_for_task(tid)), backend.encode(meta))["Item"])
for start in range(0, n, 25):
    backend.client.batch_write_item(
        RequestItems={table: [{"PutRequest": {"Item": it}} for it in items[start : start + 25]]}
    )

# What Celery's chord apply does: save the group, initialise the counter.
header = app.GroupResult(gid, [AsyncResult(t, app=app) for t in tids])
backend._apply_chord_incr((gid, header.results), None)
# The first N-1 parts have returned: the counter stands at N-1.
chord_key = str(backend.get_key_for_chord(gid))
init = backend._prepare_init_count_request(chord_key)
init["Item"][backend._count_filed.name][backend._count_filed.data_type] = str(n - 1)
backend.client.put_item(**init)

callback = {
    "task": "bench.tsum",
    "args": [],
    "kwargs": {},
    "subtask_type": None,
    "immutable": False,
    "options": {"task_id": str(uuid.uuid4()), "queue": queue},
    "chord_size": n,
}
# Warm the producer and the queue, as a running worker would have them.
app.send_task("bench.warmup", queue=queue)

request = SimpleNamespace(group=gid, chord=callback, id=tids[-1], group_index=n - 1)
requests["n"] = 0
requests["ops"] = {}
started = time.perf_counter()
backend.on_chord_part_return(request, states.SUCCESS, n - 1)
seconds = time.perf_counter() - started
print(
    json.dumps({"n": n, "seconds": seconds, "ddb_requests_last_part": requests["n"], "by_operation": requests["ops"]})
)
