"""dynachord for Celery: a result backend on dynachord's HTTP API.

Configure Celery with `result_backend = "dynachord+https://<api-id>.execute-api.<region>.amazonaws.com"`.
"""

from .backend import DynachordBackend, is_failure
from .client import Client, ClientOptions, DynachordError, DynachordTimeout, DynachordUnavailable

__all__ = [
    "Client",
    "ClientOptions",
    "DynachordBackend",
    "DynachordError",
    "DynachordTimeout",
    "DynachordUnavailable",
    "is_failure",
]
__version__ = "0.1.0"
