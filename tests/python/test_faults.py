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
still succeed, eight give 503.
"""

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

ROOT = Path(__file__).resolve().parents[2]
ATTEMPTS = 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lower_keys(headers):
    return {k.lower(): v for k, v in headers.items()}


class Stack:
    def __init__(self, base, control):
        self.base = base
        self.control = control

    def call(self, method, path, body=None, timeout=60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, lower_keys(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, lower_keys(err.headers), err.read().decode()

    def rule(self, name, **rule):
        req = urllib.request.Request(f"{self.control}/__faults/rules/{name}", data=json.dumps(rule).encode(), method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    def injected(self, name):
        with urllib.request.urlopen(f"{self.control}/__faults/rules/{name}", timeout=10) as resp:
            return json.loads(resp.read())["injected"]

    def clear(self, name):
        urllib.request.urlopen(urllib.request.Request(f"{self.control}/__faults/rules/{name}", method="DELETE"), timeout=10)

    def dynamodb(self, action):
        req = urllib.request.Request(f"{self.control}/__faults/dynamodb/{action}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200


@pytest.fixture(scope="module")
def stack():
    """The fault stack, stopped by its PID at the end (also when a test
    failed); its logs are shown if it does not come up."""
    work = Path(tempfile.mkdtemp(prefix="dynachord-faults-"))
    port, control = free_port(), free_port()
    args = [
        str(ROOT / "target/debug/devstack"), "up", "--port", str(port), "--dynamodb-port", str(free_port()),
        "--sqs-port", str(free_port()), "--faults", str(control), "--data-dir", str(work / "data"),
        "--state-dir", str(work / "state"), "--table", "dynachord-faults", "--concurrency", "4",
    ]
    env = dict(os.environ, DDB_MAX_ATTEMPTS=str(ATTEMPTS), DDB_MAX_BACKOFF_MS="200",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    log = open(work / "devstack.log", "w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        ready = work / "state" / "stack.ready"
        deadline = time.monotonic() + 600
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in [work / "devstack.log", *sorted((work / "state").glob("*.log"))] if p.exists())
                pytest.fail(f"the fault stack did not come up (exit {proc.poll()}):\n{logs}")
            time.sleep(0.5)
        yield Stack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{control}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def success(value):
    return {"status": "SUCCESS", "result": value, "traceback": None, "children": []}


def test_a_share_of_throttled_calls_is_retried_and_nothing_is_lost(stack):
    prefix = f"thr-{uuid.uuid4().hex[:10]}"
    ids = [f"{prefix}-{i}" for i in range(60)]
    # Every fourth DynamoDB call about these ids is throttled, stores and reads alike.
    stack.rule(prefix, match=prefix, error="ThrottlingException", share=0.25)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        stored = list(pool.map(lambda i: stack.call("PUT", f"/v1/tasks/{ids[i]}", success({"i": i, "n": 10**30})), range(len(ids))))
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
    for method, path, body in [("GET", f"/v1/tasks/{refused}", None), ("POST", "/v1/tasks/batch-get", {"task_ids": [ok, refused]})]:
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
        assert set(pool.map(lambda i: stack.call("PUT", f"/v1/tasks/{ids[i]}", success(i))[0], range(len(ids)))) == {200}
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
    try:
        time.sleep(2)
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
        time.sleep(3)
        stack.dynamodb("start")
        # The same function processes serve again, with no restart.
        deadline = time.monotonic() + 60
        while stack.call("GET", f"/v1/tasks/{some_acked}")[0] != 200:
            assert time.monotonic() < deadline, "the service did not resume within 60 s of DynamoDB's return"
            time.sleep(0.2)
        time.sleep(2)
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
        chunk = ids[start:start + 500]
        status, _, text = stack.call("POST", "/v1/tasks/batch-get", {"task_ids": chunk})
        assert status == 200, text
        got = [r["result"] for r in json.loads(text)["results"]]
        assert got == [acknowledged[i] for i in chunk]
    print(f"\nDynamoDB down: {outcomes['200']} stores acknowledged (all read back), {outcomes['503']} answered 503 unavailable")
