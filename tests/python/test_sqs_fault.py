"""A Celery worker on the SQS broker meets an SQS server error.

kombu 5.7's SQS consumer stops the worker on a single 5xx answer to
ReceiveMessage (dynachord_celery.sqs_fix says how). A real worker of the e2e
app consumes through a proxy on loopback that forwards to moto's SQS and
answers two ReceiveMessage calls with 500: without the fix the worker dies,
with it the worker goes on and runs the next task, whose result is stored on
the local stack.
"""

import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from worker_process import celery_worker, use_local_stack

use_local_stack(uuid.uuid4().hex[:10])

from e2e_tasks import add  # noqa: E402

HOP_BY_HOP = {"connection", "content-length", "date", "host", "server", "transfer-encoding"}


class FaultyProxy:
    """Forwards every call to SQS; once armed, answers the next `failures`
    ReceiveMessage calls with 500 instead."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.receives = 0
        self.to_fail = 0
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.should_fail(self.headers.get("X-Amz-Target", ""), body):
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                request = urllib.request.Request(proxy.upstream + self.path, data=body, headers=headers, method="POST")
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, reply, reply_headers = response.status, response.read(), response.headers
                except urllib.error.HTTPError as err:
                    status, reply, reply_headers = err.code, err.read(), err.headers
                self.send_response(status)
                for key, value in reply_headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def should_fail(self, target: str, body: bytes) -> bool:
        if "ReceiveMessage" not in target and b"Action=ReceiveMessage" not in body:
            return False
        with self.lock:
            self.receives += 1
            if self.to_fail > 0:
                self.to_fail -= 1
                self.failed += 1
                return True
            return False

    def arm(self, failures: int) -> None:
        with self.lock:
            self.to_fail = failures

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy():
    p = FaultyProxy(os.environ["AWS_ENDPOINT_URL_SQS"])
    yield p
    p.close()


def wait_until(condition, timeout: float, what: str, context=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{context()}")
        time.sleep(0.1)


def broke(log: str) -> bool:
    """Whether the worker's consumer met kombu's error on an SQS 5xx: it
    logs it as an unrecoverable error and stops, or, on a busy machine,
    logs the traceback first and stops later."""
    return "Unrecoverable error" in log or KOMBU_ERROR in log


KOMBU_ERROR = "AttributeError: 'list' object has no attribute 'get'"


@pytest.mark.parametrize("fixed", [True, False], ids=["with-sqs-fix", "without-sqs-fix"])
def test_a_worker_meets_sqs_server_errors(request, proxy, fixed):
    queue = f"fault-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, AWS_ENDPOINT_URL_SQS=proxy.url, E2E_QUEUE=queue)
    env.pop("E2E_WITHOUT_SQS_FIX", None)
    if not fixed:
        env["E2E_WITHOUT_SQS_FIX"] = "1"
    with celery_worker(request, f"fault-{queue}", env, concurrency=1) as worker:
        # The worker consumes (through the proxy) before anything fails.
        assert add.apply_async((1, 1), queue=queue).get(timeout=60) == 2
        wait_until(lambda: proxy.receives >= 1, 30, "the worker's first ReceiveMessage")
        proxy.arm(2)

        def context() -> str:
            # The worker's log, in the failure itself: xdist does not show a fixture's output.
            tail = "\n".join(worker.text().splitlines()[-40:])
            return f" (receives {proxy.receives}, failed {proxy.failed}, worker exit {worker.proc.poll()}):\n{tail}"

        # Without the fix the worker breaks at the first failure, with it it goes on to the second.
        wait_until(
            lambda: proxy.failed == 2 or broke(worker.text()),
            180,
            "two failed ReceiveMessage calls, or the worker's end",
            context,
        )
        if fixed:
            assert add.apply_async((2, 3), queue=queue).get(timeout=60) == 5
            assert worker.proc.poll() is None, "the worker stopped"
            assert not broke(worker.text())
        else:
            # kombu's own behaviour, kept in view: if a kombu release fixes
            # it, this fails and sqs_fix can go. The worker then shuts down
            # (how fast depends on the machine; it is stopped by its PID
            # after the test either way).
            # (kombu 5.7 says `AttributeError("'list' object has no attribute 'get'")`.)
            assert broke(worker.text()), context()
            assert proxy.failed >= 1
