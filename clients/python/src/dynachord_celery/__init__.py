"""dynachord for Celery: a result backend on dynachord's HTTP API.

Configure Celery with `result_backend = "dynachord+https://<api-id>.execute-api.<region>.amazonaws.com"`.
"""

from .backend import DynachordBackend, is_failure
from .client import Claim, Client, ClientOptions, DynachordError, DynachordTimeout, DynachordUnavailable
from .run_once import AlreadyRan, RunDeferred

__all__ = [
    "AlreadyRan",
    "Claim",
    "Client",
    "ClientOptions",
    "DynachordBackend",
    "DynachordError",
    "DynachordTimeout",
    "DynachordUnavailable",
    "RunDeferred",
    "is_failure",
]
__version__ = "0.1.0"
