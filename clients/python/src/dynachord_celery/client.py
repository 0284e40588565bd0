"""A small HTTP client for dynachord's v1 API.

One ``requests.Session`` per process (connections are reused; a forked child
opens its own), SigV4 signing for deployed APIs (IAM auth) through botocore's
credential chain, timeouts on every call, and retries with exponential
backoff and full jitter on throttling (429), unavailability (502/503/504, with
``Retry-After`` honoured) and connection errors.

Large results go through S3 unseen: a result too large for a request is
uploaded through a presigned URL and committed by the store; one the service
answers by reference (``result_ref``) is read from its presigned URL.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit, urlunsplit

import requests
from kombu.utils import json as kjson

logger = logging.getLogger(__name__)

#: Statuses worth another attempt: throttled, or the service is (briefly)
#: unavailable. 500 too, as in the AWS SDKs' standard retry mode: API Gateway
#: answers 500 when an invocation fails for reasons of Lambda's own. Every
#: call of the API may be sent again (a store is a conditional write).
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})

_EXECUTE_API_HOST = re.compile(r"^[a-z0-9]+\.execute-api\.([a-z0-9-]+)\.amazonaws\.com$")
_FUNCTION_URL_HOST = re.compile(r"^[a-z0-9]+\.lambda-url\.([a-z0-9-]+)\.on\.aws$")


class DynachordError(Exception):
    """An error answer from dynachord (or no answer at all).

    ``status`` is the HTTP status (0 when the service could not be reached),
    ``code`` and ``message`` the service's ``error.code`` and ``error.message``.
    """

    def __init__(self, method: str, path: str, status: int, code: str, message: str) -> None:
        super().__init__(f"dynachord {method} {path}: {status} {code}: {message}")
        self.method, self.path = method, path
        self.status, self.code, self.message = status, code, message

    def __reduce__(self) -> tuple[Any, tuple[str, str, int, str, str]]:
        # A worker pickles exceptions it reports (and Celery's own result
        # machinery may): rebuild from the fields, not from the message.
        return (type(self), (self.method, self.path, self.status, self.code, self.message))


class DynachordUnavailable(DynachordError):
    """Throttled or unreachable after every retry; safe to try again later."""


class DynachordTimeout(DynachordUnavailable):
    """The caller's time ran out (retries included) before an answer came."""


@dataclass(frozen=True)
class Claim:
    """The answer to a claim on a task's run (:meth:`Client.claim_task`)."""

    #: The claim is this caller's: it may run the task.
    claimed: bool
    #: When refused, the task's stored status: a ready one (SUCCESS,
    #: FAILURE, REVOKED) when it already ran, else the holder's.
    stored_status: str | None = None
    #: When another live claim holds the task: the seconds it lives unless
    #: renewed (``None`` when the task is ready).
    held_for: float | None = None


@dataclass(frozen=True)
class ClientOptions:
    """How the client talks to the service. All of them have sane defaults."""

    #: Sign requests with SigV4 (service ``execute-api``, or ``lambda`` for a
    #: function URL). ``None``: sign when the endpoint is an ``execute-api``
    #: or ``lambda-url`` host, never for plain ``http``.
    sign: bool | None = None
    #: The API's region; by default from the ``execute-api`` or ``lambda-url``
    #: host name, else the AWS configuration (``AWS_REGION``, profile).
    region: str | None = None
    #: Seconds to connect, and to read an answer (a long-poll adds its wait).
    #: The read time-out is past API Gateway's own 29 s limit, so a request
    #: still running on the service (a bulk get-or-delegate of many keys on
    #: a busy function) is not sent again while it may still answer: a
    #: get-or-delegate sent again appends its ``cb_args`` a second time.
    connect_timeout: float = 3.05
    read_timeout: float = 30.0
    #: Attempts after the first on a retryable answer or connection error.
    max_retries: int = 6
    #: The statuses sent again (with backoff): by default ``RETRYABLE_STATUSES``.
    #: A test suite that must see every failure of its own stack keeps the
    #: service's own retryable answers (429, 503) and drops the rest.
    retry_statuses: tuple[int, ...] = tuple(sorted(RETRYABLE_STATUSES))
    #: Whether a request that got no answer within ``read_timeout`` is sent
    #: again (a connection that could not be made always is).
    retry_timeouts: bool = True
    #: Backoff: the n-th retry waits a random time up to min(cap, base * 2**n).
    backoff_base: float = 0.05
    backoff_cap: float = 5.0
    #: Longest long-poll the service accepts in one request (MAX_WAIT_SECONDS).
    max_wait: float = 20.0
    #: A store whose body (the meta, as JSON) is larger than this many bytes
    #: has its result uploaded to the service's S3 bucket through a
    #: presigned URL instead of sent in the request (whose body the service
    #: caps at MAX_BODY_BYTES, 1 MiB).
    upload_above: int = 900_000
    #: Seconds to send or read one large result to or from S3 (its own
    #: time-out, on top of the caller's deadline).
    transfer_timeout: float = 300.0
    #: Accepted for apps coming from Celery's Redis backend, where it is a
    #: transport option: dynachord always joins a chord's results in header
    #: order (Redis's default, True); False is not available and warns.
    result_chord_ordered: bool = True

    def __post_init__(self) -> None:
        # From a Celery setting, a list: kept as a tuple.
        object.__setattr__(self, "retry_statuses", tuple(int(s) for s in self.retry_statuses))
        if not self.result_chord_ordered:
            logger.warning("dynachord: result_chord_ordered=False is not available; chord results come in header order")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> ClientOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown dynachord option(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)


#: The query keys of an endpoint that name where a function's routes are
#: served, when each function has a URL of its own (Lambda function URLs):
#: ``fetch`` serves the GETs of tasks, groups and chords, ``batch_get`` the
#: batch-get; every other route goes to the base URL (the store function's).
ROUTE_KEYS = ("fetch", "batch_get")


def parse_endpoint(url: str) -> str:
    """The service's endpoint from a backend URL, in its canonical form.

    ``dynachord+https://host`` reaches Celery as ``https://host``; a bare
    ``dynachord://host`` means HTTPS. Paths are kept (custom domains with a
    base path); a trailing slash is dropped. Behind Lambda function URLs
    (one URL per function), the query names the other functions' URLs:
    ``https://<store>.lambda-url.<region>.on.aws?fetch=https://<fetch>...&batch_get=https://<batch>...``
    (the stack's ``ResultBackend`` output is this string); a value that is
    a path is taken on the base URL's host (the local stack's
    ``/lambda-url/<function>``).
    """
    return Routes.parse(url).canonical


@dataclass(frozen=True)
class Routes:
    """Where each route is served: one base URL (an HTTP API, or the store
    function's URL), and the URLs of the functions that have their own."""

    base: str
    fetch: str | None = None
    batch_get: str | None = None

    @classmethod
    def parse(cls, url: str) -> Routes:
        if url.startswith("dynachord+"):
            url = url[len("dynachord+") :]
        elif url.startswith("dynachord://"):
            url = "https://" + url[len("dynachord://") :]
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"dynachord endpoint must be http(s)://host[:port][/path], got {url!r}")
        if parts.fragment:
            raise ValueError(f"dynachord endpoint takes no fragment: {url!r}")
        base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")).rstrip("/")
        found: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
            if key not in ROUTE_KEYS:
                raise ValueError(f"dynachord endpoint: unknown query key {key!r} in {url!r}; known: {list(ROUTE_KEYS)}")
            if key in found:
                raise ValueError(f"dynachord endpoint: {key!r} given twice in {url!r}")
            target = urlsplit(urljoin(base + "/", value))
            if target.scheme not in ("http", "https") or not target.netloc or target.query or target.fragment:
                raise ValueError(f"dynachord endpoint: {key}={value!r} is not a URL or a path: {url!r}")
            found[key] = urlunsplit(target).rstrip("/")
        return cls(base, found.get("fetch"), found.get("batch_get"))

    @property
    def canonical(self) -> str:
        """The endpoint as one string (what ``parse`` reads back)."""
        query = [(key, getattr(self, key)) for key in ROUTE_KEYS if getattr(self, key)]
        return self.base + ("?" + urlencode(query, safe=":/") if query else "")

    def base_for(self, method: str, path: str) -> str:
        """The base URL that serves ``method path`` (a v1 path)."""
        if method == "POST" and path == "/v1/tasks/batch-get":
            return self.batch_get or self.base
        if method == "GET" and path.startswith(("/v1/tasks/", "/v1/groups/", "/v1/chords/")):
            return self.fetch or self.base
        return self.base

    def hosts(self) -> set[str]:
        return {urlsplit(url).hostname or "" for url in (self.base, self.fetch, self.batch_get) if url}


def _region_of(host: str) -> str | None:
    match = _EXECUTE_API_HOST.match(host) or _FUNCTION_URL_HOST.match(host)
    return match.group(1) if match else None


def _service_of(host: str) -> str:
    """SigV4's service for a host: ``lambda`` for a function URL, else
    ``execute-api`` (an HTTP API, or a custom domain in front of one)."""
    return "lambda" if _FUNCTION_URL_HOST.match(host) else "execute-api"


class Client:
    """dynachord's v1 API. Thread-safe; fork-safe (sessions are per process)."""

    def __init__(self, endpoint: str, options: ClientOptions = ClientOptions()) -> None:
        self.routes = Routes.parse(endpoint)
        #: The endpoint in its canonical form (see :func:`parse_endpoint`).
        self.endpoint = self.routes.canonical
        self.options = options
        regions = {_region_of(host) for host in self.routes.hosts()} - {None}
        self._sign = options.sign if options.sign is not None else bool(regions)
        self._region = options.region or (regions.pop() if len(regions) == 1 else None)
        self._local = threading.local()
        #: The service's longest result lifetime, once it has told us.
        self._max_expires_in: int | None = None
        self._signer: Any = None
        if self._sign:
            self._signer = self._make_signer()

    # -- transport ---------------------------------------------------------

    def _make_signer(self) -> Any:
        import botocore.session
        from botocore.auth import SigV4Auth

        session = botocore.session.get_session()
        region = self._region or session.get_config_variable("region")
        if not region:
            raise ValueError(
                "dynachord: cannot tell the API's region; set the 'region' option "
                "(result_backend_transport_options) or AWS_REGION"
            )
        credentials = session.get_credentials()
        if credentials is None:
            raise ValueError(
                "dynachord: no AWS credentials found (environment, profile, or role) "
                "to sign requests to an IAM-authorised API"
            )
        self._region = region
        return lambda service: SigV4Auth(credentials.get_frozen_credentials(), service, region)

    def _session(self) -> requests.Session:
        # One session per thread and process: requests' Session is not
        # guaranteed thread-safe, and sockets must not cross a fork.
        pid = os.getpid()
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None or getattr(self._local, "pid", None) != pid:
            session = requests.Session()
            session.headers["User-Agent"] = "dynachord-celery/0.1"
            self._local.session, self._local.pid = session, pid
        return session

    def _headers(self, method: str, url: str, body: bytes | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._signer is not None:
            from botocore.awsrequest import AWSRequest

            request = AWSRequest(method=method, url=url, data=body or b"", headers=headers)
            self._signer(_service_of(urlsplit(url).hostname or "")).add_auth(request)
            headers = dict(request.headers.items())
        return headers

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        pause = random.uniform(0, min(self.options.backoff_cap, self.options.backoff_base * 2**attempt))
        if retry_after:
            with contextlib.suppress(ValueError):
                pause = max(pause, min(float(retry_after), self.options.backoff_cap))
        return pause

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        extra_read_timeout: float = 0.0,
        ok: Iterable[int] = (200, 204),
        deadline: float | None = None,
    ) -> requests.Response:
        """Sends one API call, retrying what is retryable; returns an ``ok``
        answer or raises :class:`DynachordError`. With a ``deadline``
        (``time.monotonic()``), every attempt and every pause between them
        ends by it: past it, :class:`DynachordTimeout`."""
        url = self.routes.base_for(method, path) + path + ("?" + urlencode(params) if params else "")
        # Bytes are a body encoded already (see put_task).
        data = body if isinstance(body, bytes) or body is None else _dumps(body).encode("utf-8")

        def send(timeout: tuple[float, float]) -> requests.Response:
            headers = self._headers(method, url, data)
            return self._session().request(method, url, data=data, headers=headers, timeout=timeout)

        read_timeout = self.options.read_timeout + extra_read_timeout
        return self._with_retries(method, path, send, read_timeout, frozenset(ok), deadline)

    def _with_retries(
        self,
        method: str,
        path: str,
        send: Callable[[tuple[float, float]], requests.Response],
        read_timeout: float,
        ok: frozenset[int],
        deadline: float | None,
    ) -> requests.Response:
        """Calls ``send(timeout)`` until it answers an ``ok`` status, retrying
        connection errors and retryable statuses with backoff (see :meth:`request`)."""
        attempt = 0

        def out_of_time() -> DynachordTimeout:
            why = f"the caller's timeout ran out after {attempt + 1} attempt(s)"
            return DynachordTimeout(method, path, 0, "timeout", why)

        while True:
            timeout = (self.options.connect_timeout, read_timeout)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise out_of_time()
                timeout = (min(timeout[0], left), min(timeout[1], left))
            try:
                response = send(timeout)
            except requests.RequestException as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise out_of_time() from exc
                no_retry = isinstance(exc, requests.Timeout) and not self.options.retry_timeouts
                if attempt >= self.options.max_retries or no_retry:
                    raise DynachordUnavailable(method, path, 0, "unreachable", str(exc)) from exc
                pause, why = self._backoff(attempt, None), f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code in ok:
                    return response
                if response.status_code not in self.options.retry_statuses or attempt >= self.options.max_retries:
                    raise _error(method, path, response)
                pause = self._backoff(attempt, response.headers.get("Retry-After"))
                why = f"status {response.status_code}"
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise out_of_time()
            attempt += 1
            logger.debug("dynachord %s %s: %s; retry %d in %.2fs", method, path, why, attempt, pause)
            time.sleep(pause)

    # -- large results (S3) -------------------------------------------------

    def _upload(self, owner_path: str, result_json: bytes, expires_in: Any = None) -> str:
        """Uploads JSON (a result, a meta's large fields, or a saved group's
        result), gzip-compressed, through a presigned URL the service hands
        out for the task or group at ``owner_path``; returns its SHA-256 for
        the store's ``result_upload``. The URL never replaces an object: a
        412 means an earlier attempt's upload is there already."""
        data = gzip.compress(result_json, compresslevel=1)
        sha256 = hashlib.sha256(data).hexdigest()
        path = owner_path + "/upload"
        ask: dict[str, Any] = {"sha256": sha256, "bytes": len(data)}
        if isinstance(expires_in, int) and (self._max_expires_in is None or expires_in <= self._max_expires_in):
            ask["expires_in"] = expires_in
        try:
            grant = self.request("POST", path, body=ask).json()
        except DynachordError as exc:
            if not isinstance(getattr(exc, "max_expires_in", None), int):
                raise
            # Longer than the service keeps results: the store clamps it (see _put_expiring).
            ask.pop("expires_in")
            grant = self.request("POST", path, body=ask).json()
        url, headers = str(grant["url"]), {str(k): str(v) for k, v in (grant.get("headers") or {}).items()}

        def send(timeout: tuple[float, float]) -> requests.Response:
            return self._session().put(url, data=data, headers=headers, timeout=timeout)

        self._with_retries("PUT", path + " (S3)", send, self.options.transfer_timeout, frozenset({200, 412}), None)
        logger.debug("dynachord uploaded %s: %d bytes, %d compressed", owner_path, len(result_json), len(data))
        return sha256

    def _download(self, reference: Mapping[str, Any], owner_path: str, deadline: float | None) -> Any:
        """What the service answered by reference (``result_ref``): read
        from its presigned URL, gunzipped and decoded."""
        url = str(reference["url"])

        def send(timeout: tuple[float, float]) -> requests.Response:
            return self._session().get(url, timeout=timeout)

        what = owner_path + " (S3)"
        response = self._with_retries("GET", what, send, self.options.transfer_timeout, frozenset({200}), deadline)
        data = response.content
        if reference.get("encoding", "gzip") == "gzip":
            data = gzip.decompress(data)
        return _loads(data.decode("utf-8"))

    def _whole(self, owner_path: str, meta: dict[str, Any], deadline: float | None) -> dict[str, Any]:
        """The meta (or saved group) with its result read in, when the
        service answered it by reference; with its arguments too when the
        reference holds the meta's large fields (``"fields": true``)."""
        reference = meta.pop("result_ref", None)
        if isinstance(reference, dict):
            downloaded = self._download(reference, owner_path, deadline)
            if reference.get("fields"):
                meta.update(dict(downloaded))
            else:
                meta["result"] = downloaded
        return meta

    # -- the v1 API ---------------------------------------------------------

    def put_task(self, task_id: str, meta: Mapping[str, Any]) -> dict[str, Any] | None:
        """Stores task meta. Returns the service's receipt, or ``None`` when the
        store was refused because the task already holds a state that must not
        be replaced (409: e.g. SUCCESS is never overwritten)."""
        body = self._clamp_expiry(meta)
        encoded = _dumps(body).encode("utf-8")
        path = _task_path(task_id)
        upload = len(encoded) > self.options.upload_above
        # When the meta is too large for the item even without its result
        # (result_extended arguments or a traceback of hundreds of KB), its
        # large fields go to S3 together, as one object.
        fields, fields_above = False, min(self.options.upload_above, _FIELDS_ABOVE)
        if len(encoded) > fields_above:
            rest = {name: value for name, value in body.items() if name != "result"}
            fields = len(_dumps(rest).encode("utf-8")) > fields_above
        if upload or fields:
            # The result (or the large fields) goes to S3 first, then the
            # store commits it.
            large = {name: body[name] for name in (_LARGE_FIELDS if fields else ("result",)) if name in body}
            uploaded = _dumps(large if fields else large.get("result")).encode("utf-8")
            try:
                sha256 = self._upload(path, uploaded, body.get("expires_in"))
            except DynachordError as exc:
                # A deployment without a results bucket still takes a meta
                # that fits a request and compresses under the item limit.
                if upload or exc.code != "large_results_disabled":
                    raise
            else:
                body = {name: value for name, value in body.items() if name not in large}
                body["result_upload"] = {"sha256": sha256, **({"fields": True} if fields else {})}
                upload = True
        response = self._put_expiring(path, body, ok=(200, 409), encoded=None if upload else encoded)
        if response.status_code == 409:
            logger.debug("dynachord kept the stored state of %s: %s", task_id, response.text)
            return None
        return dict(response.json())

    def claim_task(
        self, task_id: str, meta: Mapping[str, Any], token: str, lease_seconds: int, rerun: bool = False
    ) -> Claim:
        """Stores ``meta`` (a state that is not ready, STARTED) as a claim on
        the task's run: it is written only if the task is not ready and no
        other live claim holds it; the same ``token`` renews it. A ``rerun``
        (a part a chord's redrive sent again) may also replace a FAILURE or
        REVOKED, never a SUCCESS. One request, one conditional write (see
        the API's "Claiming a task's run")."""
        claim: dict[str, Any] = {"token": token, "lease_seconds": lease_seconds}
        if rerun:
            claim["rerun"] = True
        body = dict(meta, claim=claim)
        response = self._put_expiring(_task_path(task_id), body, ok=(200, 409))
        if response.status_code == 200:
            return Claim(True)
        error = dict(_loads(response.text)).get("error") or {}
        held = error.get("claim_expires_in") if error.get("code") == "task_claimed" else None
        return Claim(False, stored_status=error.get("stored_status"), held_for=held)

    def get_task(self, task_id: str, wait: float = 0.0, deadline: float | None = None) -> dict[str, Any]:
        """The task's meta (``PENDING`` when unknown or expired); with ``wait``,
        the service long-polls up to that many seconds until it is ready.
        ``deadline`` bounds the call, retries included (see :meth:`request`)."""
        wait = self._clamp_wait(wait)
        params = {"wait": _seconds(wait)} if wait > 0 else None
        path = _task_path(task_id)
        response = self.request("GET", path, params=params, extra_read_timeout=wait, deadline=deadline)
        return self._whole(path, dict(_loads(response.text)), deadline)

    def batch_get(self, task_ids: list[str], wait: float = 0.0, deadline: float | None = None) -> list[dict[str, Any]]:
        """Metas of ``task_ids`` in request order (one call, at most the
        service's MAX_BATCH_IDS ids); with ``wait``, until all are ready.
        ``deadline`` bounds the call, retries included (see :meth:`request`).
        A result the service answers with a reference (past the response's
        size budget, or in S3) is read on its own, so every item is a whole meta."""
        wait = self._clamp_wait(wait)
        body: dict[str, Any] = {"task_ids": task_ids}
        if wait > 0:
            body["wait"] = round(wait, 3)
        response = self.request("POST", "/v1/tasks/batch-get", body=body, extra_read_timeout=wait, deadline=deadline)
        results = list(_loads(response.text)["results"])
        for i, item in enumerate(results):
            if isinstance(item, dict) and "ref" in item:
                results[i] = self.get_task(str(item["task_id"]), deadline=deadline)
            elif isinstance(item, dict):
                results[i] = self._whole(_task_path(str(item.get("task_id"))), item, deadline)
        return results

    def forget(self, task_id: str) -> None:
        self.request("DELETE", _task_path(task_id))

    def save_group(self, group_id: str, result: Any, expires_in: int | None = None) -> None:
        """Saves a group's result (``GroupResult.as_tuple()``); one too
        large for a request (a group of tens of thousands) is uploaded to
        S3 first, as a large task result is."""
        path = _group_path(group_id)
        body: dict[str, Any] = {"result": result}
        if expires_in is not None:
            body["expires_in"] = expires_in
        body = self._clamp_expiry(body)
        encoded = _dumps(body).encode("utf-8")
        if len(encoded) <= self.options.upload_above:
            self._put_expiring(path, body, encoded=encoded)
            return
        uploaded = _dumps(body.pop("result")).encode("utf-8")
        body["result_upload"] = {"sha256": self._upload(path, uploaded, body.get("expires_in"))}
        self._put_expiring(path, body)

    def _clamp_expiry(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The body with an ``expires_in`` past the service's known maximum cut to it."""
        body = dict(body)
        requested, limit = body.get("expires_in"), self._max_expires_in
        if isinstance(requested, int) and limit is not None and requested > limit:
            body["expires_in"] = limit
        return body

    def _put_expiring(
        self, path: str, body: Mapping[str, Any], ok: Iterable[int] = (200, 204), encoded: bytes | None = None
    ) -> requests.Response:
        """PUTs a body that may carry ``expires_in``. A lifetime longer than
        the service allows (``MAX_RESULT_TTL_SECONDS``) is clamped to its
        maximum, with a warning, instead of failing every store. ``encoded``
        is the body, clamped, already encoded (it is not encoded again)."""
        requested = body.get("expires_in")
        body = self._clamp_expiry(body)
        try:
            return self.request("PUT", path, body=body if encoded is None else encoded, ok=ok)
        except DynachordError as exc:
            limit = getattr(exc, "max_expires_in", None)
            if not isinstance(requested, int) or not isinstance(limit, int) or requested <= limit:
                raise
            logger.warning(
                "dynachord: result_expires of %d s is longer than the service keeps results (%d s, its "
                "MAX_RESULT_TTL_SECONDS); results expire after %d s",
                requested,
                limit,
                limit,
            )
            self._max_expires_in = limit
            body["expires_in"] = limit
            return self.request("PUT", path, body=body, ok=ok)

    def get_group(self, group_id: str) -> dict[str, Any] | None:
        """The saved group (``{"result": ...}``), or ``None`` if there is none."""
        path = _group_path(group_id)
        response = self._get_or_none(path, "group_not_found")
        return None if response is None else self._whole(path, dict(_loads(response.text)), None)

    def delete_group(self, group_id: str) -> None:
        self.request("DELETE", _group_path(group_id))

    def chord(self, group_id: str, failed_ids: bool = False) -> dict[str, Any] | None:
        """A chord's progress (size, done, state, callback_id) with its parts
        counted by state (succeeded, failed, pending), or ``None`` before its
        first part has been counted. With ``failed_ids``, also the failed
        parts' task ids (at most 1000; ``failed_ids_truncated`` says if more
        failed)."""
        path = "/v1/chords/" + quote(group_id, safe="") + ("?failed_ids=true" if failed_ids else "")
        response = self._get_or_none(path, "chord_not_found")
        return None if response is None else dict(response.json())

    def redrive_chord(self, group_id: str, queue: str | None = None, queue_prefix: str | None = None) -> dict[str, Any]:
        """Sends a chord's failed parts again, with their task ids and
        arguments (stored with ``result_extended``), and has it join again
        once they report: ``{"group_id", "state": "redriving", "redriving",
        "redrives"}``. Each part goes to the queue its result names, with
        ``queue_prefix`` before it, or to ``queue``. A chord still open, with
        no failed part, or whose parts' arguments were not stored raises
        :class:`DynachordError` (``redrive_refused``)."""
        body = {k: v for k, v in (("queue", queue), ("queue_prefix", queue_prefix)) if v}
        path = "/v1/chords/" + quote(group_id, safe="") + "/redrive"
        return dict(self.request("POST", path, body, ok=(202,)).json())

    def _get_or_none(self, path: str, not_found: str) -> requests.Response | None:
        """GET, with the service's own "no such thing" 404 as ``None``; any
        other 404 (a wrong endpoint or base path) is an error."""
        response = self.request("GET", path, ok=(200, 404))
        if response.status_code == 200:
            return response
        if _error_code(response) != not_found:
            raise _error("GET", path, response)
        return None

    def _clamp_wait(self, wait: float) -> float:
        return max(0.0, min(float(wait), self.options.max_wait))


def _dumps(value: Any) -> str:
    """JSON as Celery's json serializer writes it (datetimes, UUIDs, ... tagged)."""
    return str(kjson.dumps(value))  # type: ignore[no-untyped-call]


def _loads(text: str) -> Any:
    return kjson.loads(text)  # type: ignore[no-untyped-call]


def _seconds(wait: float) -> str:
    return f"{wait:.3f}".rstrip("0").rstrip(".")


#: The fields of a task meta that may be large; a meta too large to send
#: even without its result has them uploaded together (see put_task).
_LARGE_FIELDS = ("result", "args", "kwargs", "traceback")

#: A meta whose fields other than its result are larger than this (JSON,
#: uncompressed) has them uploaded: under it, they fit DynamoDB's 400 KB
#: item however they compress.
_FIELDS_ABOVE = 256_000


def _task_path(task_id: str) -> str:
    return "/v1/tasks/" + quote(task_id, safe="")


def _group_path(group_id: str) -> str:
    return "/v1/groups/" + quote(group_id, safe="")


def _error_code(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _error(method: str, path: str, response: requests.Response) -> DynachordError:
    error: Any = {}
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", (response.text or response.reason or "")[:500]
    cls = DynachordUnavailable if response.status_code in RETRYABLE_STATUSES else DynachordError
    exc = cls(method, path, response.status_code, code, message)
    if isinstance(error, dict) and isinstance(error.get("max_expires_in"), int):
        # The service's longest result lifetime (see Client._put_expiring).
        exc.max_expires_in = error["max_expires_in"]  # type: ignore[attr-defined]
    return exc
