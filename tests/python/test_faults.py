"""Faults: DynamoDB throttling and DynamoDB down, on a stack of their own.

The module starts a second local stack (`devstack up --faults PORT`) on free
ports, with DynamoDB Local on disk (so its data survives a restart) and the
fault proxy of devstack/src/faults.rs between the functions and DynamoDB
Local. Requests go over HTTP to the real functions under cargo lambda watch,
as a worker sends them. Each test's faults only touch calls that carry its
own id prefix, so nothing here depends on order; the DynamoDB-down test
stops DynamoDB Local for the whole fault stack, so the module's tests run
one after another (as pytest runs them) and never on the main stack.

The functions run with DDB_MAX_ATTEMPTS=8: seven throttled attempts in a row
still succeed, eight give 503. Chord claims have a 3 s lease
(CHORD_LEASE_SECONDS), a chord is failed after 3 joins that failed
(CHORD_MAX_ATTEMPTS), and the stream pump gives an invocation 15 s.
"""

import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from endpoints import endpoint_at, url
from log_tail import show_tail

ROOT = Path(__file__).resolve().parents[2]
ATTEMPTS = 8
LEASE = 3
CHORD_ATTEMPTS = 3
# A small batch-get response budget, so that a batch of a few small results
# already comes back with references.
BATCH_BUDGET = 65536


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lower_keys(headers):
    return {k.lower(): v for k, v in headers.items()}


class Stack:
    def __init__(self, base, control, sqs, pid, state):
        # In this run's layout (the router, or each function's own URL).
        self.base = endpoint_at(base)
        self.control = control
        self.sqs = sqs
        self.pid = pid
        self.state = state

    def metric_lines(self):
        """The functions' EMF lines (CloudWatch metrics) so far."""
        log = (self.state / "watch.log").read_text(errors="replace")
        return [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"_aws"' in line]

    def metrics_of(self, request_id, deadline=30):
        """The EMF line of one request, once the function has written it."""
        until = time.monotonic() + deadline
        while time.monotonic() < until:
            for line in self.metric_lines():
                if line.get("request_id") == request_id:
                    return line
            time.sleep(0.2)
        raise AssertionError(f"no metrics line for request {request_id}")

    def metrics_after(self, mark, route, deadline=30):
        """The first EMF line of `route` after the first `mark` lines: a
        healthy request's line carries no request id (it writes only its
        metrics), so it is found by its place in this stack's own log."""
        until = time.monotonic() + deadline
        while time.monotonic() < until:
            for line in self.metric_lines()[mark:]:
                if line.get("Route") == route:
                    return line
            time.sleep(0.2)
        raise AssertionError(f"no metrics line for {route} after line {mark}")

    def call(self, method, path, body=None, timeout=60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url(method, path, self.base), data=data, method=method)
        req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, lower_keys(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, lower_keys(err.headers), err.read().decode()

    def rule(self, name, **rule):
        req = urllib.request.Request(
            f"{self.control}/__faults/rules/{name}", data=json.dumps(rule).encode(), method="PUT"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    def injected(self, name):
        with urllib.request.urlopen(f"{self.control}/__faults/rules/{name}", timeout=10) as resp:
            return json.loads(resp.read())["injected"]

    def clear(self, name):
        urllib.request.urlopen(
            urllib.request.Request(f"{self.control}/__faults/rules/{name}", method="DELETE"), timeout=10
        )

    def dynamodb(self, action):
        req = urllib.request.Request(f"{self.control}/__faults/dynamodb/{action}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200


@pytest.fixture(scope="module")
def stack(request):
    """The fault stack, stopped by its PID at the end (also when a test
    failed); its logs are shown if it does not come up or a test failed."""
    failed_before = request.session.testsfailed
    work = Path(tempfile.mkdtemp(prefix="dynachord-faults-"))
    port, control, sqs = free_port(), free_port(), free_port()
    args = [
        str(ROOT / "target/debug/devstack"),
        "up",
        "--port",
        str(port),
        "--dynamodb-port",
        str(free_port()),
        "--sqs-port",
        str(sqs),
        "--faults",
        str(control),
        "--data-dir",
        str(work / "data"),
        "--state-dir",
        str(work / "state"),
        "--table",
        "dynachord-faults",
        "--concurrency",
        "4",
        "--invoke-timeout-secs",
        "15",
        # The tests' own queues, as ./dev grants them (a deployment names its own).
        "--callback-queues",
        "*",
    ]
    env = dict(
        os.environ,
        DDB_MAX_ATTEMPTS=str(ATTEMPTS),
        DDB_MAX_BACKOFF_MS="200",
        CHORD_LEASE_SECONDS=str(LEASE),
        CHORD_MAX_ATTEMPTS=str(CHORD_ATTEMPTS),
        BATCH_RESPONSE_BYTES=str(BATCH_BUDGET),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    log = open(work / "devstack.log", "w")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        ready = work / "state" / "stack.ready"
        deadline = time.monotonic() + 600
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                    for p in [work / "devstack.log", *sorted((work / "state").glob("*.log"))]
                    if p.exists()
                )
                pytest.fail(f"the fault stack did not come up (exit {proc.poll()}):\n{logs}")
            time.sleep(0.5)
        urls = [f"http://127.0.0.1:{p}" for p in (port, control, sqs)]
        yield Stack(*urls, proc.pid, work / "state")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if request.session.testsfailed > failed_before:
            for path in [work / "devstack.log", work / "state" / "watch.log"]:
                if path.exists():
                    show_tail(request, f"the fault stack's {path.name}", path.read_text(errors="replace"), 80)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def success(value):
    return {"status": "SUCCESS", "result": value, "traceback": None, "children": []}


def test_a_share_of_throttled_calls_is_retried_and_nothing_is_lost(stack):
    prefix = f"thr-{uuid.uuid4().hex[:10]}"
    ids = [f"{prefix}-{i}" for i in range(60)]
    # Every fourth DynamoDB call about these ids is throttled, stores and reads alike.
    stack.rule(prefix, match=prefix, error="ThrottlingException", share=0.25)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        stored = list(
            pool.map(
                lambda i: stack.call("PUT", f"/v1/tasks/{ids[i]}", success({"i": i, "n": 10**30})), range(len(ids))
            )
        )
        assert [s for s, _, _ in stored] == [200] * len(ids), [t for s, _, t in stored if s != 200][:3]
        fetched = list(pool.map(lambda task_id: stack.call("GET", f"/v1/tasks/{task_id}"), ids))
    assert [s for s, _, _ in fetched] == [200] * len(ids)
    assert [json.loads(t)["result"] for _, _, t in fetched] == [{"i": i, "n": 10**30} for i in range(len(ids))]
    status, _, text = stack.call("POST", "/v1/tasks/batch-get", {"task_ids": ids})
    assert status == 200, text
    assert [r["result"]["i"] for r in json.loads(text)["results"]] == list(range(len(ids)))
    assert stack.injected(prefix) >= len(ids) // 2, "the proxy throttled one call in four"
    stack.clear(prefix)


@pytest.mark.parametrize("error", ["ThrottlingException", "ProvisionedThroughputExceededException"])
def test_throttling_succeeds_within_the_configured_attempts_and_is_a_503_past_them(stack, error):
    prefix = f"lim-{uuid.uuid4().hex[:10]}"
    ok, refused = f"{prefix}-ok", f"{prefix}-refused"
    # Attempts - 1 throttled calls in a row: the last attempt gets through.
    stack.rule(ok, match=ok, error=error, limit=ATTEMPTS - 1)
    assert stack.call("PUT", f"/v1/tasks/{ok}", success("stored"))[0] == 200
    assert stack.injected(ok) == ATTEMPTS - 1
    stack.rule(ok, match=ok, error=error, limit=ATTEMPTS - 1)
    status, _, text = stack.call("GET", f"/v1/tasks/{ok}")
    assert (status, json.loads(text)["result"]) == (200, "stored")
    stack.clear(ok)

    # Every attempt throttled: 503 throttled with Retry-After, nothing stored.
    stack.rule(refused, match=refused, error=error)
    status, headers, text = stack.call("PUT", f"/v1/tasks/{refused}", success("never"))
    assert status == 503 and json.loads(text)["error"]["code"] == "throttled", text
    assert int(headers["retry-after"]) >= 1
    assert stack.injected(refused) == ATTEMPTS
    for method, path, body in [
        ("GET", f"/v1/tasks/{refused}", None),
        ("POST", "/v1/tasks/batch-get", {"task_ids": [ok, refused]}),
    ]:
        status, headers, text = stack.call(method, path, body)
        assert status == 503 and json.loads(text)["error"]["code"] == "throttled", (method, text)
        assert int(headers["retry-after"]) >= 1
    stack.clear(refused)
    status, _, text = stack.call("GET", f"/v1/tasks/{refused}")
    assert (status, json.loads(text)["status"]) == (200, "PENDING"), "a refused store left nothing behind"


def test_unprocessed_batch_keys_are_retried_and_a_503_past_the_attempts(stack):
    prefix = f"unp-{uuid.uuid4().hex[:10]}"
    ids = [f"{prefix}-{i}" for i in range(250)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert set(pool.map(lambda i: stack.call("PUT", f"/v1/tasks/{ids[i]}", success(i))[0], range(len(ids)))) == {
            200
        }
    held = f"{prefix}-1"  # ids -1, -10..-19, -100..-199: keys in all three chunks of 100
    # Those keys come back unprocessed (the rest of their batches answered)
    # attempts - 1 times, then DynamoDB serves them.
    stack.rule(prefix, match=held, error="UnprocessedKeys", limit=ATTEMPTS - 1)
    status, _, text = stack.call("POST", "/v1/tasks/batch-get", {"task_ids": ids})
    assert status == 200, text
    assert [r["result"] for r in json.loads(text)["results"]] == list(range(len(ids)))
    assert stack.injected(prefix) == ATTEMPTS - 1
    # Unprocessed every time: 503, never a partial answer.
    stack.rule(prefix, match=held, error="UnprocessedKeys")
    status, headers, text = stack.call("POST", "/v1/tasks/batch-get", {"task_ids": ids})
    assert status == 503 and json.loads(text)["error"]["code"] == "throttled", text
    assert int(headers["retry-after"]) >= 1
    stack.clear(prefix)


def test_dynamodb_down_gives_503_loses_nothing_acknowledged_and_recovers_by_itself(stack):
    prefix = f"down-{uuid.uuid4().hex[:10]}"
    acknowledged = {}
    lock = threading.Lock()
    stop = threading.Event()
    outcomes = {"200": 0, "503": 0, "other": []}

    def writer(n):
        i = 0
        while not stop.is_set():
            task_id, value = f"{prefix}-w{n}-{i}", {"w": n, "i": i}
            status, headers, text = stack.call("PUT", f"/v1/tasks/{task_id}", success(value))
            with lock:
                if status == 200:
                    outcomes["200"] += 1
                    acknowledged[task_id] = value
                elif status == 503 and json.loads(text)["error"]["code"] == "unavailable" and "retry-after" in headers:
                    outcomes["503"] += 1
                else:
                    outcomes["other"].append((status, text))
            i += 1
            time.sleep(0.02)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for w in writers:
        w.start()

    def wait_for(what, condition, limit=60):
        deadline = time.monotonic() + limit
        while not condition():
            assert time.monotonic() < deadline, f"gave up waiting for {what}"
            time.sleep(0.05)

    try:
        # Writers are acknowledged before the outage...
        wait_for("acknowledged writes", lambda: len(acknowledged) >= 20)
        stack.dynamodb("stop")
        # While it is down, every route answers a retryable 503.
        some_acked = next(iter(acknowledged))
        for method, path, body in [
            ("GET", f"/v1/tasks/{some_acked}", None),
            ("POST", "/v1/tasks/batch-get", {"task_ids": [some_acked]}),
            ("PUT", f"/v1/tasks/{prefix}-during", success("x")),
        ]:
            status, headers, text = stack.call(method, path, body)
            assert status == 503, (method, text)
            assert json.loads(text)["error"]["code"] == "unavailable" and int(headers["retry-after"]) >= 1
        # ...and refused with 503 during it, a few times each...
        wait_for("503s during the outage", lambda: outcomes["503"] >= 8)
        stack.dynamodb("start")
        # The same function processes serve again, with no restart.
        back = time.monotonic()
        while stack.call("GET", f"/v1/tasks/{some_acked}")[0] != 200:
            assert time.monotonic() < back + 60, "the service did not resume within 60 s of DynamoDB's return"
            time.sleep(0.1)
        resumed_after = time.monotonic() - back
        # ...and acknowledged again after it.
        after = len(acknowledged)
        wait_for("acknowledged writes after the outage", lambda: len(acknowledged) >= after + 20)
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert outcomes["other"] == [], outcomes["other"][:3]
    assert outcomes["503"] > 0, "some stores met the outage"
    assert outcomes["200"] > 0
    # Nothing acknowledged is lost: every 200 reads back identical.
    ids = sorted(acknowledged)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        status, _, text = stack.call("POST", "/v1/tasks/batch-get", {"task_ids": chunk})
        assert status == 200, text
        got = [r["result"] for r in json.loads(text)["results"]]
        assert got == [acknowledged[i] for i in chunk]
    print(
        f"\nDynamoDB down: {outcomes['200']} stores acknowledged (all read back), "
        f"{outcomes['503']} answered 503 unavailable; served again {resumed_after:.2f} s after DynamoDB Local answered"
    )


def descendants(pid):
    """Every process below `pid`, from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_with_connection(stack_pid, client_port, server_port):
    """The process below `stack_pid` that owns the loopback connection from
    `client_port` to `server_port`."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{client_port:04X}" and fields[2] == f"0100007F:{server_port:04X}":
            inode = fields[9]
    assert inode, f"no connection from port {client_port} to {server_port}"
    for pid in descendants(stack_pid):
        try:
            if any(os.readlink(fd) == f"socket:[{inode}]" for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return pid
        except OSError:
            continue
    raise AssertionError("no process of the fault stack owns the held connection")


def test_a_chord_join_killed_while_its_send_is_in_flight_is_taken_over_without_sending_again(stack):
    """chord-join is killed while its SendMessage is on the wire: nobody can
    know whether SQS took the message. The invocation that takes the chord
    over when the lease runs out counts it as sent and marks the chord
    dispatched, sending nothing (invariant O5: at most once)."""
    import boto3

    prefix = f"kill-{uuid.uuid4().hex[:10]}"
    queue, gid, callback_id = f"{prefix}-q", f"{prefix}-g", f"{prefix}-cb"
    sqs = boto3.client(
        "sqs", endpoint_url=stack.sqs, region_name="us-east-1", aws_access_key_id="local", aws_secret_access_key="local"
    )
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    # chord-join's first SendMessage to this queue is held: never forwarded,
    # never answered. The invocation has claimed the chord by then.
    stack.rule(queue, match=queue, error="Hold", limit=1)
    callback = {
        "task": "proj.tasks.tsum",
        "args": [],
        "kwargs": {},
        "immutable": False,
        "options": {"task_id": callback_id, "queue": queue},
    }
    for i in range(3):
        part = {
            "status": "SUCCESS",
            "result": i,
            "group_id": gid,
            "group_index": i,
            "chord": {"size": 3, "callback": callback},
        }
        assert stack.call("PUT", f"/v1/tasks/{prefix}-p{i}", part)[0] == 200
    deadline = time.monotonic() + 60
    while stack.injected(queue) < 1:
        assert time.monotonic() < deadline, "chord-join never sent the callback"
        time.sleep(0.1)
    code, _, text = stack.call("GET", f"/v1/chords/{gid}")
    assert (code, json.loads(text).get("state")) == (200, "joining"), text
    # Kill the invocation there, by PID, as a crash or a timeout would.
    with urllib.request.urlopen(f"{stack.control}/__faults/rules/{queue}", timeout=10) as resp:
        [held_port] = json.loads(resp.read())["held_from"]
    victim = process_with_connection(stack.pid, held_port, int(stack.control.rsplit(":", 1)[1]))
    assert Path(f"/proc/{victim}/cmdline").read_bytes().split(b"\0")[0].endswith(b"chord-join")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    # The pump retries the batch; the claim's lease runs out; a new invocation
    # takes over, finds the send that was in flight, and sends nothing.
    deadline = time.monotonic() + 120
    while (status := json.loads(stack.call("GET", f"/v1/chords/{gid}")[2]))["state"] != "dispatched":
        assert time.monotonic() < deadline, f"the chord was never taken over after the kill: {status}"
        time.sleep(0.2)
    taken_over_after = time.monotonic() - killed_at
    assert status["done"] == 3, status
    # The held call was never forwarded. A send comes before the mark, so had
    # the takeover sent again, the message would be on the queue by now.
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    assert not messages, f"{len(messages)} callbacks sent again"
    stack.clear(queue)
    print(f"\nchord-join killed mid-send: taken over {taken_over_after:.1f} s after the kill, nothing sent again")


def test_a_poison_chord_fails_after_its_attempts_and_never_holds_up_a_healthy_one(stack):
    """Every send to the poison chord's queue is throttled (an error a retry
    might fix). The healthy chord, whose parts are stored right after the
    poison's, in the same stream, is dispatched within seconds; the poison
    chord is failed clearly after CHORD_MAX_ATTEMPTS joins, with ChordError
    on its callback, and its records stop coming back."""
    import boto3

    prefix = f"poison-{uuid.uuid4().hex[:10]}"
    sqs = boto3.client(
        "sqs", endpoint_url=stack.sqs, region_name="us-east-1", aws_access_key_id="local", aws_secret_access_key="local"
    )
    poison_queue, healthy_queue = f"{prefix}-bad", f"{prefix}-good"
    sqs.create_queue(QueueName=poison_queue)
    healthy_url = sqs.create_queue(QueueName=healthy_queue)["QueueUrl"]
    # The needle is the queue's URL path, which only SendMessage carries
    # (the parts' items name the queue, not its URL).
    stack.rule(poison_queue, match=f"123456789012/{poison_queue}", error="ThrottlingException")

    def store_chord(name, queue):
        callback = {
            "task": "proj.tasks.tsum",
            "args": [],
            "kwargs": {},
            "immutable": False,
            "options": {"task_id": f"{prefix}-{name}-cb", "queue": queue},
        }
        for i in range(3):
            part = {
                "status": "SUCCESS",
                "result": i,
                "group_id": f"{prefix}-{name}",
                "group_index": i,
                "chord": {"size": 3, "callback": callback},
            }
            assert stack.call("PUT", f"/v1/tasks/{prefix}-{name}-p{i}", part)[0] == 200

    store_chord("poison", poison_queue)
    started = time.monotonic()
    store_chord("healthy", healthy_queue)
    messages = []
    deadline = time.monotonic() + 60
    while not messages:
        assert time.monotonic() < deadline, "the healthy chord was held up"
        messages = sqs.receive_message(QueueUrl=healthy_url, WaitTimeSeconds=1).get("Messages", [])
    healthy_after = time.monotonic() - started
    envelope = json.loads(base64.b64decode(messages[0]["Body"]))
    assert json.loads(base64.b64decode(envelope["body"]))[0] == [[0, 1, 2]]

    deadline = time.monotonic() + 120
    while True:
        status = json.loads(stack.call("GET", f"/v1/chords/{prefix}-poison")[2])
        if status.get("state") == "failed":
            break
        assert time.monotonic() < deadline, f"the poison chord was never failed: {status}"
        time.sleep(0.2)
    assert f"after {CHORD_ATTEMPTS} attempts" in status["error"], status
    assert "ThrottlingException" in status["error"], status
    callback = json.loads(stack.call("GET", f"/v1/tasks/{prefix}-poison-cb")[2])
    assert callback["status"] == "FAILURE" and callback["result"]["exc_type"] == "ChordError", callback
    # Once failed, its records stop coming back: no more sends are tried.
    tried = stack.injected(poison_queue)
    settle = time.monotonic() + 5
    while time.monotonic() < settle:
        time.sleep(0.5)
    assert stack.injected(poison_queue) == tried, "the failed chord's records still come back"
    stack.clear(poison_queue)
    print(
        f"\npoison chord: healthy chord dispatched after {healthy_after:.1f} s; poison failed after "
        f"{CHORD_ATTEMPTS} attempts ({tried} throttled sends)"
    )


def test_a_cache_entry_whose_finish_keeps_failing_after_its_callback_went_out_never_calls_back_twice(stack):
    """The processing cache's callback goes out, then every attempt at
    finishing the entry (settling -> cached) is throttled past the SDK's
    retries, so chord-join's invocation fails and the pump retries the
    record. The retry finishes the entry from the claim it kept and sends
    nothing; without that, the claim's lease (3 s) would run out and a new
    claim would send the callback a second time."""
    import boto3

    prefix = f"finish-{uuid.uuid4().hex[:10]}"
    sqs = boto3.client(
        "sqs", endpoint_url=stack.sqs, region_name="us-east-1", aws_access_key_id="local", aws_secret_access_key="local"
    )
    queue = f"{prefix}-q"
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    operation = {
        "task": "tests.measure",
        "queue": queue,
        "callback": {"task": "tests.measure_done", "queue": queue},
        "quarantine": {"task": "tests.quarantine", "queue": queue},
    }
    key = {"op": "measure", "uri": f"s3://{prefix}/a.png"}
    # Only an entry's finish has this update expression, and only this test
    # uses the cache on the fault stack: every finish is throttled until
    # chord-join's invocation has given up on it.
    stack.rule(prefix, match="REMOVE #w, #wc, #wb, #token", error="ThrottlingException")
    status, _, text = stack.call("POST", "/v1/cache/get-or-delegate", {**key, "cb_args": 1, "operation": operation})
    assert status == 200, text
    task_id = json.loads(text)["task_id"]
    assert stack.call("PUT", f"/v1/tasks/{task_id}", success({"w": 64}))[0] == 200

    def lines(message):
        log = (stack.state / "watch.log").read_text(errors="replace").splitlines()
        return [line for line in log if task_id in line and message in line]

    deadline = time.monotonic() + 120
    while not lines("settling failed; will retry"):
        assert time.monotonic() < deadline, "\n".join(["chord-join never gave up finishing", *lines("")])
        time.sleep(0.2)
    assert len(lines("cache callback sent")) == 1
    assert stack.injected(prefix) >= 6, "every attempt at finishing was throttled"
    stack.clear(prefix)
    while json.loads(stack.call("POST", "/v1/cache/entry", key)[2])["state"] != "cached":
        assert time.monotonic() < deadline, "\n".join(["the entry was never finished", *lines("")])
        time.sleep(0.2)
    messages = []
    # Watched past two claim leases: a second claim would have sent by then.
    settle = time.monotonic() + 3 * LEASE
    while time.monotonic() < settle:
        messages += sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    names = [json.loads(base64.b64decode(m["Body"]))["headers"]["task"] for m in messages]
    assert sorted(names) == ["tests.measure", "tests.measure_done"], "\n".join([str(names), *lines("")])
    status, _, text = stack.call("POST", "/v1/cache/get-or-delegate", {**key, "operation": operation})
    assert json.loads(text)["result"] == {"w": 64}, text


def test_a_batch_get_past_its_response_budget_answers_references_the_package_reads_on_its_own(stack):
    """Not a fault: this stack is the one with a small BATCH_RESPONSE_BYTES.
    No response passes the budget as Lambda counts it (the body JSON-escaped),
    results come in order while the rest still fit, and the Python client
    reads each reference with a GET, so its caller gets every result whole."""
    from dynachord_celery import Client

    prefix = f"budget-{uuid.uuid4().hex[:10]}"
    ids = [f"{prefix}-{i}" for i in range(12)]
    results = {task_id: {"i": i, "text": '"quoted" ' * 1500} for i, task_id in enumerate(ids)}
    for task_id in ids:
        assert stack.call("PUT", f"/v1/tasks/{task_id}", success(results[task_id]))[0] == 200
    status, _, text = stack.call("POST", "/v1/tasks/batch-get", {"task_ids": ids})
    assert status == 200
    assert len(json.dumps(text)) - 2 <= BATCH_BUDGET, "the escaped body is within the budget"
    items = json.loads(text)["results"]
    whole = [item for item in items if "ref" not in item]
    assert 0 < len(whole) < len(ids), "some whole results, then references"
    assert items[: len(whole)] == whole, "whole results come first, in request order"
    for item, task_id in zip(items, ids):
        assert item["task_id"] == task_id and item["status"] == "SUCCESS"
    metas = Client(stack.base).batch_get(ids)
    assert [m["result"] for m in metas] == [results[task_id] for task_id in ids]


def test_a_store_that_dies_between_its_s3_put_and_its_item_write_leaves_nothing_served(stack):
    import boto3
    from dynachord_celery.client import Client

    task_id = f"crash-{uuid.uuid4().hex[:10]}"
    big = os.urandom(300_000).hex()  # 600 KB that barely compresses: it goes to S3 before the item
    # Every DynamoDB call about this id fails: the object is written, the item never is.
    stack.rule(task_id, match=task_id, error="ThrottlingException")
    status, _, text = stack.call("PUT", f"/v1/tasks/{task_id}", success(big))
    assert status == 503, text
    stack.clear(task_id)
    s3 = boto3.client(
        "s3", endpoint_url=stack.sqs, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    listed = s3.list_objects_v2(Bucket="dynachord-local-results", Prefix=f"default/task/{task_id}/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert len(keys) == 1, "the object was written first"
    tags = s3.get_object_tagging(Bucket="dynachord-local-results", Key=keys[0])["TagSet"]
    assert tags == [{"Key": "dynachord-expiry", "Value": "1d"}], "its lifecycle rule removes it"
    # No item points to it: never served.
    status, _, text = stack.call("GET", f"/v1/tasks/{task_id}")
    assert (status, json.loads(text)["status"]) == (200, "PENDING")
    status, _, text = stack.call("POST", "/v1/tasks/batch-get", {"task_ids": [task_id]})
    assert json.loads(text)["results"][0]["status"] == "PENDING"
    # The store sent again is stored and served, exactly.
    assert stack.call("PUT", f"/v1/tasks/{task_id}", success(big))[0] == 200
    assert Client(stack.base).get_task(task_id)["result"] == big


def test_each_request_writes_its_metrics_and_a_chord_its_join_latency(stack):
    """Every request writes one EMF line under its route, with its outcome
    and its DynamoDB requests and retries (here made to retry by the proxy);
    a dispatched chord writes its join latency from its newest part's store."""
    prefix = f"metrics-{uuid.uuid4().hex[:10]}"
    stored = f"{prefix}-stored"
    stack.rule(stored, match=stored, error="ThrottlingException", limit=2)
    status, headers, text = stack.call("PUT", f"/v1/tasks/{stored}", success(1))
    assert status == 200, text
    line = stack.metrics_of(headers["x-dynachord-request-id"])
    assert line["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Route"]]
    assert line["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "dynachord"
    assert (line["Route"], line["Requests"]) == ("PutTask", 1)
    assert not {"Ok", "Refused", "Rejected", "Throttled", "Failed"} & set(line), "a success has no other outcome"
    assert (line["DynamoDBCalls"], line["DynamoDBRetries"]) == (3, 2), "two throttled attempts, then the write"
    assert line["Latency"] > 0
    stack.clear(stored)
    outcomes = [
        (("PUT", f"/v1/tasks/{stored}", {"status": "STARTED"}), "Refused"),
        (("PUT", f"/v1/tasks/{stored}", {"status": "NOT A STATE"}), "Rejected"),
    ]
    for (method, path, body), outcome in outcomes:
        _, headers, _ = stack.call(method, path, body)
        assert stack.metrics_of(headers["x-dynachord-request-id"])[outcome] == 1, outcome
    throttled = f"{prefix}-throttled"
    stack.rule(throttled, match=throttled, error="ThrottlingException")
    status, headers, _ = stack.call("PUT", f"/v1/tasks/{throttled}", success(1))
    assert status == 503
    assert stack.metrics_of(headers["x-dynachord-request-id"])["Throttled"] == 1
    stack.clear(throttled)
    mark = len(stack.metric_lines())
    stack.call("GET", f"/v1/tasks/{prefix}-never?wait=0.3")
    line = stack.metrics_after(mark, "GetTask")
    # A healthy request writes its metrics alone: no request id, no zero retries.
    assert "request_id" not in line and "DynamoDBRetries" not in line, line
    # The long-poll ends at most one pause (250 ms) before its wait is up.
    assert (line["Route"], line["Pending"], 0 < line["LongPollWait"] < 2000) == ("GetTask", 1, True)
    mark = len(stack.metric_lines())
    stack.call("POST", "/v1/tasks/batch-get", {"task_ids": [stored, stored, "x"]})
    assert stack.metrics_after(mark, "BatchGet")["BatchSize"] == 3

    # A chord of three: its join latency, once dispatched.
    before = sum(1 for line in stack.metric_lines() if "ChordJoinLatency" in line)
    callback = {"task": "t.cb", "args": [], "kwargs": {}, "options": {"task_id": f"{prefix}-cb", "queue": prefix}}
    import boto3

    boto3.client(
        "sqs", endpoint_url=stack.sqs, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    ).create_queue(QueueName=prefix)
    started = time.time()
    for i in range(3):
        part = {"status": "SUCCESS", "result": i, "group_id": f"{prefix}-g", "group_index": i}
        part["chord"] = {"size": 3, "callback": callback}
        assert stack.call("PUT", f"/v1/tasks/{prefix}-p{i}", part)[0] == 200
    deadline = time.monotonic() + 60
    while True:
        latencies = [line["ChordJoinLatency"] for line in stack.metric_lines() if "ChordJoinLatency" in line]
        if len(latencies) > before:
            break
        assert time.monotonic() < deadline, "no join latency written"
        time.sleep(0.2)
    assert 0 <= latencies[-1] <= (time.time() - started) * 1000
