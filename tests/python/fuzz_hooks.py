"""schemathesis hooks of the contract test (loaded through SCHEMATHESIS_HOOKS).

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

import schemathesis

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


@schemathesis.hook
def filter_path_parameters(context, path_parameters):
    """`.` and `..` as a path segment are normalised away by HTTP clients and
    proxies before any server sees them: no request can carry them."""
    return not any(str(v) in (".", "..") for v in (path_parameters or {}).values())
