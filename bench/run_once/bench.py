"""What dynachord's run-once guard costs per task: the same task with and
without it, in one run, on the local stack with a real `celery worker`
(prefork, one process, SQS on moto). For each variant: the service
requests a run makes (counted in the worker), and the latency from send
to `get()` returning, median over --n tasks; the variants are interleaved
so that they share the machine's noise. `./dev bench --run-once`.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).parent

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=200, help="tasks per variant")
args = parser.parse_args()

os.environ.setdefault("DYNACHORD_ENDPOINT", "http://127.0.0.1:9000")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_ENDPOINT_URL_SQS", os.environ.get("SQS_ENDPOINT", "http://127.0.0.1:5000"))
os.environ["BENCH_QUEUE"] = f"run-once-bench-{uuid.uuid4().hex[:8]}"
counts_fd, counts_name = tempfile.mkstemp(prefix="run-once-counts-")
os.close(counts_fd)
os.environ["BENCH_COUNTS"] = counts_name
sys.path.insert(0, str(HERE))

from app import app, guarded, guarded_tracked, plain, plain_tracked  # noqa: E402

VARIANTS = [
    ("plain", plain),
    ("run_once", guarded),
    ("plain, track_started", plain_tracked),
    ("run_once, track_started", guarded_tracked),
]

log_fd, log_name = tempfile.mkstemp(prefix="run-once-worker-", suffix=".log")
with os.fdopen(log_fd, "w") as log:
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "app",
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=WARNING",
        ],
        cwd=HERE,
        env=dict(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
try:
    # Warm: the worker has declared its queue and runs each variant.
    for _, task in VARIANTS:
        task.delay(0).get(timeout=120)
    latencies: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    ids: dict[str, list[str]] = {name: [] for name, _ in VARIANTS}
    for i in range(args.n):
        for name, task in VARIANTS:
            started = time.perf_counter()
            result = task.delay(i)
            assert result.get(timeout=60) == i
            latencies[name].append(time.perf_counter() - started)
            ids[name].append(result.id)
    deadline = time.monotonic() + 30
    counted: dict[str, int] = {}
    while time.monotonic() < deadline:
        counted = dict(line.split() for line in Path(counts_name).read_text().splitlines() if line.strip())
        if all(i in counted for names in ids.values() for i in names):
            break
        time.sleep(0.2)
except BaseException:
    print(Path(log_name).read_text()[-5000:], file=sys.stderr)
    raise
finally:
    worker.terminate()
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, 9)
        worker.wait()
    Path(counts_name).unlink(missing_ok=True)
    Path(log_name).unlink(missing_ok=True)

base = {
    "plain": "plain",
    "run_once": "plain",
    "plain, track_started": "plain, track_started",
    "run_once, track_started": "plain, track_started",
}
print(f"run-once guard, {args.n} tasks per variant, one prefork worker, local stack (medians)")
print(f"{'variant':<26} {'requests/task':>14} {'send->get ms':>13} {'vs without':>11}")
medians = {name: statistics.median(values) * 1000 for name, values in latencies.items()}
for name, _ in VARIANTS:
    requests = statistics.median(int(counted[i]) for i in ids[name])
    ratio = medians[name] / medians[base[name]]
    print(f"{name:<26} {requests:>14.0f} {medians[name]:>13.1f} {ratio:>10.2f}x")
app.close()
