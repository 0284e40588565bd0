"""Loaded into every run of Celery's suite (`-p suite_plugin`).

1. kombu 5.7's SQS consumer stops the whole worker on one 5xx answer from
   SQS, which moto gives under load: the package's fix
   (dynachord_celery.sqs_fix) is applied.
2. The suite's one session worker is a thread of the pytest process. If it
   ends before the session asks it to (`state.should_terminate` still
   unset), every later test would wait out its timeout for a worker that is
   gone. Instead, why it ended (the worker's own ERROR and CRITICAL records,
   "Unrecoverable error" among them) is written to the file named by
   CELERY_SUITE_WORKER_DIED, and the pytest process is interrupted (SIGINT,
   so the junit file of the tests run so far is still written). run.py then
   runs the tests not yet run in a fresh process and reports the death.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback

from celery.contrib.testing.worker import TestWorkController
from celery.worker import state
from dynachord_celery.sqs_fix import survive_sqs_server_errors

survive_sqs_server_errors()

_REPORT = os.environ.get("CELERY_SUITE_WORKER_DIED")


class _Recent(logging.Handler):
    """The worker's last ERROR and CRITICAL records, kept to say why it ended."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records = [*self.records[-19:], self.format(record)]


def _report(text: str) -> None:
    if _REPORT:
        with open(_REPORT, "a", encoding="utf-8") as out:
            out.write(text + "\n")


def _watched(start):
    def start_and_watch(self: TestWorkController) -> None:
        recent = _Recent()
        recent.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s"))
        # The worker's logging was set up before this thread started
        # (setup_app_for_worker), so the handler stays.
        logging.getLogger().addHandler(recent)
        ended = ""
        try:
            start(self)
        except BaseException:
            ended = traceback.format_exc()
            raise
        finally:
            if state.should_terminate is None:
                _report(
                    f"{time.strftime('%H:%M:%S')} the session worker's thread "
                    f"({threading.current_thread().name}) ended while the session still ran\n"
                    + (ended or "it returned; its last error records:\n")
                    + "\n".join(recent.records)
                )
                os.kill(os.getpid(), signal.SIGINT)

    return start_and_watch


TestWorkController.start = _watched(TestWorkController.start)
