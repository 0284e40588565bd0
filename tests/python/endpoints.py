"""The local stack's endpoint in the layout this run tests.

`DYNACHORD_ENDPOINT` is the backend URL the package is given: the router
(the HTTP API's layout, one base URL) or each function's own URL (the
function-URL layout: `/lambda-url/<function>` on cargo lambda watch, with
the query naming fetch's and batch-fetch's). Raw requests in the tests go
where the package would send them (`url`).
"""

import os

from dynachord_celery.client import Routes

ENDPOINT = os.environ.get("DYNACHORD_ENDPOINT", "http://127.0.0.1:9000")
FUNCTION_URLS = Routes.parse(ENDPOINT).fetch is not None


def endpoint_at(base: str) -> str:
    """The endpoint of a local stack served at `base`, in this run's layout."""
    if not FUNCTION_URLS:
        return base
    return Routes(f"{base}/lambda-url/store", f"{base}/lambda-url/fetch", f"{base}/lambda-url/batch-fetch").canonical


def url(method: str, path: str, endpoint: str = ENDPOINT) -> str:
    """The URL a v1 request goes to: the base that serves its route."""
    return Routes.parse(endpoint).base_for(method, path) + path


#: The function-URL layout's functions, each with the operations it serves
#: (schemathesis's filters), for fuzzing each function at its own URL.
FUNCTION_OPERATIONS = {
    "fetch": ["--include-method", "GET"],
    "batch_get": ["--include-path", "/v1/tasks/batch-get"],
    "base": ["--exclude-method", "GET", "--exclude-path", "/v1/tasks/batch-get"],
}
