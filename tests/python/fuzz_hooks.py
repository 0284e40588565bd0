"""schemathesis hooks of the contract test (loaded through SCHEMATHESIS_HOOKS).

cargo lambda watch cannot put a body that is not UTF-8 into the API Gateway
event it builds and answers 500 itself, before any function runs; API
Gateway sends such a body base64-encoded and the functions answer it 400
(tested in the integration suite by invoking the function with that event).
Exactly that failure is set aside.

The emulator also, rarely and not reproducibly, answers a request 500 itself
(the same problem body, no function error in its log) when its hand-off to
a function instance fails under concurrent requests. Such a failure is set
aside only when the same request, sent again (up to three times while the
emulator keeps answering it so), gets the service's own
answer (below 500, and a JSON `error.code` unless it is a 200): the input is
then shown to be handled. Every other failure stands, and each set-aside one
is printed.

Python 3.11's `ast` keeps the depth of the tree it is converting in state
shared by all threads of the interpreter, so two threads converting at once
can fail with `SystemError: AST constructor recursion depth mismatch`
(Python 3.12 keeps it per call). Hypothesis parses the source of filter
predicates while schemathesis's workers generate cases, and a run with
`--workers 2` hit it now and then. `ast.parse` is made to convert one tree
at a time in this process, and so does every compile() (seen failing the
same way from Hypothesis's lambda descriptions).
"""

import ast
import builtins
import sys
import threading
import time

import requests
import schemathesis

_replayed: dict = {}
# Times a request the emulator itself answered 500 is sent again.
REPLAYS = 3

if sys.version_info < (3, 12):
    # Every conversion goes through compile(), ast.parse's too: one at a time
    # (reentrant, as ast.parse calls compile).
    _compile, _ast_parse, _ast_lock = builtins.compile, ast.parse, threading.RLock()

    def _compile_one_at_a_time(*args, **kwargs):
        with _ast_lock:
            return _compile(*args, **kwargs)

    def _parse_one_at_a_time(*args, **kwargs):
        with _ast_lock:
            return _ast_parse(*args, **kwargs)

    builtins.compile = _compile_one_at_a_time
    ast.parse = _parse_one_at_a_time


def _not_utf8(body) -> bool:
    if not body:
        return False
    if isinstance(body, str):
        try:
            body = body.encode("utf-8")
        except UnicodeEncodeError:
            return True
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _served_when_sent_again(request) -> bool:
    """Sends `request` again, once per failed response; True when the
    service itself answers it."""
    key = id(request)
    if key not in _replayed:
        ok, verdicts = False, []
        # Up to REPLAYS times while the emulator keeps answering it 500 itself.
        for attempt in range(REPLAYS):
            if attempt:
                time.sleep(0.5)
            try:
                again = requests.Session().send(request, timeout=65)
                body = again.json() if again.content else None
            except (requests.RequestException, ValueError, AttributeError) as e:
                verdicts.append(repr(e))
                continue
            verdicts.append(f"{again.status_code}")
            ok = again.status_code < 500 and (again.status_code == 200 or "code" in (body or {}).get("error", {}))
            if ok or b"httpstatuses.com/500" not in again.content:
                break
        verdict = ", ".join(verdicts)
        print(
            f"fuzz_hooks: the emulator answered {request.method} {request.path_url[:80]} 500 itself;"
            f" sent again: {verdict} ({'set aside' if ok else 'stands'})",
            file=sys.stderr,
        )
        _replayed[key] = (request, ok)
    return _replayed[key][1]


@schemathesis.hook
def filter_failure(context, failure, case, response):
    emulator_500 = response.status_code == 500 and b"httpstatuses.com/500" in response.content
    if not emulator_500:
        return True
    if _not_utf8(response.request.body):
        return False
    return not _served_when_sent_again(response.request)


@schemathesis.hook
def filter_path_parameters(context, path_parameters):
    """`.` and `..` as a path segment are normalised away by HTTP clients and
    proxies before any server sees them: no request can carry them."""
    return not any(str(v) in (".", "..") for v in (path_parameters or {}).values())
