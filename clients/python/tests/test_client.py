"""Unit tests of the client: endpoints, retries, errors and signing, against a
scripted HTTP server on loopback (the real service is exercised end to end
by the repository's tests/python/test_celery_e2e.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from celery import Celery
from celery.app.backends import by_url
from celery.app.task import Context
from celery.exceptions import ImproperlyConfigured
from dynachord_celery import (
    Client,
    ClientOptions,
    DynachordBackend,
    DynachordError,
    DynachordTimeout,
    DynachordUnavailable,
)
from dynachord_celery.client import Routes, parse_endpoint

FAST = dict(backoff_base=0.001, backoff_cap=0.01)


class Script:
    """Answers requests from a list of (status, headers, body), recording them."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], Any]] = []
        self.seen: list[dict[str, Any]] = []
        #: Seconds each answer waits before it is sent.
        self.delay = 0.0


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            script.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
            time.sleep(script.delay)
            status, headers, payload = (
                script.answers.pop(0)
                if script.answers
                else (500, {}, {"error": {"code": "script_empty", "message": "no answer scripted"}})
            )
            data = b"" if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_endpoints_from_backend_urls() -> None:
    assert parse_endpoint("dynachord+http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert (
        parse_endpoint("https://abc123.execute-api.eu-west-1.amazonaws.com/")
        == "https://abc123.execute-api.eu-west-1.amazonaws.com"
    )
    assert parse_endpoint("dynachord://results.example.com/prod") == "https://results.example.com/prod"
    for bad in (
        "ftp://host",
        "http://",
        "http://host?x=1",
        "127.0.0.1:9000",
        "http://host#f",
        "http://host?fetch=ftp://other",
        "http://host?fetch=/a&fetch=/b",
        "http://host?fetch=http://other?x=1",
    ):
        with pytest.raises(ValueError, match="dynachord endpoint"):
            parse_endpoint(bad)


def test_function_url_endpoints_name_each_functions_url() -> None:
    store = "https://s1.lambda-url.eu-west-1.on.aws/"
    fetch = "https://f2.lambda-url.eu-west-1.on.aws/"
    batch = "https://b3.lambda-url.eu-west-1.on.aws/"
    # The stack's ResultBackend output, as pasted.
    routes = Routes.parse(f"dynachord+{store}?fetch={fetch}&batch_get={batch}")
    assert routes.base_for("PUT", "/v1/tasks/t1") == store.rstrip("/")
    assert routes.base_for("DELETE", "/v1/tasks/t1") == store.rstrip("/")
    assert routes.base_for("POST", "/v1/tasks/t1/upload") == store.rstrip("/")
    assert routes.base_for("POST", "/v1/chords/g/redrive") == store.rstrip("/")
    assert routes.base_for("POST", "/v1/cache/get-or-delegate") == store.rstrip("/")
    for path in ("/v1/tasks/t1", "/v1/groups/g", "/v1/chords/g"):
        assert routes.base_for("GET", path) == fetch.rstrip("/")
    assert routes.base_for("POST", "/v1/tasks/batch-get") == batch.rstrip("/")
    # The canonical string reads back the same (Celery pickles the backend by it).
    assert Routes.parse(routes.canonical) == routes
    # Paths are taken on the base URL's host: the local stack's layout.
    local = Routes.parse(
        "http://127.0.0.1:9000/lambda-url/store?fetch=/lambda-url/fetch&batch_get=/lambda-url/batch-fetch"
    )
    assert local.base_for("GET", "/v1/tasks/t") == "http://127.0.0.1:9000/lambda-url/fetch"
    assert local.base_for("POST", "/v1/tasks/batch-get") == "http://127.0.0.1:9000/lambda-url/batch-fetch"
    assert local.base_for("PUT", "/v1/tasks/t") == "http://127.0.0.1:9000/lambda-url/store"
    # One base serves every route (an HTTP API).
    single = Routes.parse("https://abc123.execute-api.eu-west-1.amazonaws.com")
    routes_seen = [("GET", "/v1/tasks/t"), ("POST", "/v1/tasks/batch-get"), ("PUT", "/v1/tasks/t")]
    assert {single.base_for(m, p) for m, p in routes_seen} == {single.base}


def test_each_request_goes_to_the_function_that_serves_it(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(200, {}, {"status": "PENDING", "result": None}), (200, {}, {"results": []}), (204, {}, None)]
    client = Client(f"{url}/store?fetch=/fetch&batch_get=/batch", ClientOptions(**FAST))
    client.get_task("t1")
    client.batch_get([])
    client.forget("t1")
    assert [(s["method"], s["path"]) for s in script.seen] == [
        ("GET", "/fetch/v1/tasks/t1"),
        ("POST", "/batch/v1/tasks/batch-get"),
        ("DELETE", "/store/v1/tasks/t1"),
    ]


def test_celery_finds_the_backend_by_its_url_scheme() -> None:
    app = Celery("t", set_as_current=False)
    cls, url = by_url("dynachord+http://127.0.0.1:9000", app.loader)
    assert cls is DynachordBackend
    assert url == "http://127.0.0.1:9000"
    app.conf.result_backend = "dynachord+http://127.0.0.1:9000"
    assert isinstance(app.backend, DynachordBackend)
    assert app.backend.as_uri() == "dynachord+http://127.0.0.1:9000"


@pytest.mark.parametrize("serializer", ["pickle", "msgpack", "yaml", "json"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_results_of_any_serializer_are_stored_as_opaque_payloads_and_read_back(
    serializer: str, compression: str | None
) -> None:
    import datetime

    from celery import states
    from kombu.serialization import dumps, loads
    from kombu.utils.json import dumps as json_dumps

    app = Celery("t", set_as_current=False, result_backend="dynachord+http://127.0.0.1:9000")
    app.conf.result_serializer = serializer
    app.conf.result_accept_content = [serializer, "json"]
    app.conf.result_compression = compression
    app.conf.result_extended = True
    backend = app.backend
    value = {"tuple": (1, 2), "bytes": b"\x00\xff", "when": datetime.datetime(2026, 12, 5, 1, 2, 3)}
    if serializer == "yaml":
        value.pop("bytes")  # PyYAML's safe dumper has no bytes
    if serializer == "msgpack":
        value.pop("when")  # msgpack has no datetimes
    if serializer == "json":
        value = {"plain": [1, "two"]}
    # What the serializer itself gives back is what the reader gets.
    _, _, payload = dumps(value, serializer=serializer)
    expected = loads(payload, content_type=backend.content_type, content_encoding=backend.content_encoding, force=True)
    request = Context({"id": "t1", "task": "t.x", "args": [value], "kwargs": {}, "delivery_info": {}})
    body = backend._store_body("t1", value, states.SUCCESS, request=request)
    wire = json.loads(json_dumps(body))  # what goes to the service, and comes back
    assert backend.opaque is (serializer != "json" or compression is not None)
    if backend.opaque:
        assert set(wire["result"]) == {"dynachord_encoded"}
    meta = backend._decode(wire)
    assert meta["result"] == expected and meta["args"] == [expected]
    # A failure stays Celery's JSON, which chord-join reads, and reads back as the exception.
    exc_meta = backend.encode_result(ValueError("boom", 42), states.FAILURE)
    failed = backend._store_body("t2", exc_meta, states.FAILURE, request=request)
    assert failed["result"]["exc_type"] == "ValueError"
    exc = backend._decode(json.loads(json_dumps(failed)))["result"]
    assert isinstance(exc, ValueError) and exc.args == ("boom", 42)
    # A chord callback the service sends gets the results decoded.
    assert backend.from_opaque_results([wire["result"], wire["result"]]) == [expected, expected]


def test_a_payload_of_a_content_type_the_app_does_not_accept_is_not_decoded() -> None:
    from kombu.exceptions import ContentDisallowed

    writer = Celery("t", set_as_current=False, result_backend="dynachord+http://127.0.0.1:9000")
    writer.conf.result_serializer = "pickle"
    writer.conf.result_accept_content = ["pickle"]
    opaque = writer.backend.to_opaque({"x": 1})
    reader = Celery("t", set_as_current=False, result_backend="dynachord+http://127.0.0.1:9000")
    with pytest.raises(ContentDisallowed):
        reader.backend.from_opaque(opaque)


def test_unknown_options_are_refused() -> None:
    app2 = Celery("t", set_as_current=False, result_backend="dynachord+http://127.0.0.1:9000")
    app2.conf.result_backend_transport_options = {"retires": 3}
    with pytest.raises(ImproperlyConfigured, match="unknown dynachord option"):
        _ = app2.backend


def test_throttling_is_retried_honouring_retry_after(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [
        (503, {"Retry-After": "0"}, {"error": {"code": "throttled", "message": "slow down"}}),
        (429, {}, {"message": "Too Many Requests"}),
        (200, {}, {"status": "SUCCESS", "result": 3, "task_id": "t1"}),
    ]
    client = Client(url, ClientOptions(**FAST))
    assert client.get_task("t1")["result"] == 3
    assert [s["path"] for s in script.seen] == ["/v1/tasks/t1"] * 3


def test_a_500_is_sent_again_as_the_aws_sdks_do(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [
        (500, {}, {"type": "https://httpstatuses.com/500", "status": 500, "title": "Internal Server Error"}),
        (200, {}, {"status": "SUCCESS", "result": 3, "task_id": "t1"}),
    ]
    client = Client(url, ClientOptions(**FAST))
    assert client.get_task("t1")["result"] == 3
    assert len(script.seen) == 2


def test_a_suite_can_see_every_500_the_first_time(server: tuple[str, Script]) -> None:
    """With ``retry_statuses`` of the service's own retryable answers, a 500
    is raised at once (the e2e tests run so), while a 503 is still retried."""
    url, script = server
    script.answers = [
        (503, {"Retry-After": "0"}, {"error": {"code": "unavailable", "message": "briefly"}}),
        (500, {}, {"type": "https://httpstatuses.com/500", "status": 500, "title": "Internal Server Error"}),
    ]
    options = ClientOptions.from_mapping({"retry_statuses": [429, 503], **FAST})
    with pytest.raises(DynachordError) as err:
        Client(url, options).get_task("t1")
    assert err.value.status == 500 and len(script.seen) == 2


def test_a_request_left_without_an_answer_is_not_sent_again_when_told(server: tuple[str, Script]) -> None:
    url, script = server
    script.delay = 1.0
    script.answers = [(200, {}, {"status": "SUCCESS", "result": 3, "task_id": "t1"})] * 2
    options = ClientOptions(read_timeout=0.2, retry_timeouts=False, **FAST)
    with pytest.raises(DynachordUnavailable) as err:
        Client(url, options).get_task("t1")
    assert err.value.code == "unreachable" and len(script.seen) == 1


def test_retries_end_in_a_clear_unavailable_error(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [
        (503, {"Retry-After": "0"}, {"error": {"code": "throttled", "message": "DynamoDB is throttling"}})
    ] * 3
    client = Client(url, ClientOptions(max_retries=2, **FAST))
    with pytest.raises(DynachordUnavailable) as err:
        client.get_task("t1")
    assert (err.value.status, err.value.code) == (503, "throttled")
    assert "DynamoDB is throttling" in str(err.value)
    assert len(script.seen) == 3


def test_an_unreachable_service_is_unavailable_after_retries() -> None:
    client = Client("http://127.0.0.1:9", ClientOptions(max_retries=1, connect_timeout=0.5, **FAST))
    with pytest.raises(DynachordUnavailable) as err:
        client.get_task("t1")
    assert (err.value.status, err.value.code) == (0, "unreachable")


def test_bad_input_is_not_retried_and_says_why(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(400, {}, {"error": {"code": "bad_body", "message": "args must be a list"}})]
    with pytest.raises(DynachordError) as err:
        Client(url, ClientOptions(**FAST)).put_task("t1", {"status": "SUCCESS", "args": 1})
    assert not isinstance(err.value, DynachordUnavailable)
    assert (err.value.status, err.value.code, err.value.message) == (400, "bad_body", "args must be a list")
    assert len(script.seen) == 1


def test_a_refused_overwrite_is_not_an_error(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(409, {}, {"error": {"code": "state_conflict", "message": "SUCCESS is final"}})]
    assert Client(url, ClientOptions(**FAST)).put_task("t1", {"status": "STARTED"}) is None


def test_only_the_services_own_404_means_no_such_group(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [
        (404, {}, {"error": {"code": "group_not_found", "message": "no group g1"}}),
        (404, {}, {"message": "Not Found"}),
    ]
    client = Client(url, ClientOptions(**FAST))
    assert client.get_group("g1") is None
    with pytest.raises(DynachordError) as err:
        client.get_group("g1")
    assert err.value.status == 404


def test_long_polls_ask_the_server_to_wait_capped_at_its_maximum(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(200, {}, {"status": "PENDING", "result": None}), (200, {}, {"results": []})]
    client = Client(url, ClientOptions(max_wait=20, **FAST))
    client.get_task("a b/c", wait=60)
    client.batch_get([], wait=1.5)
    assert script.seen[0]["path"] == "/v1/tasks/a%20b%2Fc?wait=20"
    assert json.loads(script.seen[1]["body"]) == {"task_ids": [], "wait": 1.5}


def test_execute_api_hosts_are_signed_with_sigv4(server: tuple[str, Script], monkeypatch: pytest.MonkeyPatch) -> None:
    url, script = server
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    script.answers = [(200, {}, {"status": "PENDING", "result": None})]
    client = Client(url, ClientOptions(sign=True, region="eu-west-1", **FAST))
    client.get_task("t1")
    auth = script.seen[0]["headers"]["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/execute-api/aws4_request" in auth
    assert "X-Amz-Date" in script.seen[0]["headers"]
    # Plain http to loopback is not signed unless asked.
    assert not Client(url)._sign
    assert Client("https://abc123.execute-api.us-east-2.amazonaws.com")._region == "us-east-2"


def test_function_urls_are_signed_for_the_lambda_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = Client("https://s1.lambda-url.ap-south-1.on.aws?fetch=https://f2.lambda-url.ap-south-1.on.aws")
    assert client._sign and client._region == "ap-south-1"
    headers = client._headers("GET", "https://f2.lambda-url.ap-south-1.on.aws/v1/tasks/t1", None)
    assert "/ap-south-1/lambda/aws4_request" in headers["Authorization"]


def test_signing_without_credentials_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ValueError, match="no AWS credentials"):
        Client("https://abc123.execute-api.us-east-1.amazonaws.com")


def test_the_sqs_fix_reads_kombus_error_answer_as_no_messages() -> None:
    from dynachord_celery.sqs_fix import survive_sqs_server_errors
    from kombu.transport.SQS import Channel

    assert survive_sqs_server_errors()
    patched = Channel._on_messages_ready
    assert survive_sqs_server_errors() and Channel._on_messages_ready is patched  # once only
    # kombu's _on_list_ready answers [] for a 5xx, a timeout or a 599.
    assert patched(object(), "https://sqs/q", "q", []) == 0
    # A real answer still goes to kombu: no messages is 0, as before.
    assert patched(object(), "https://sqs/q", "q", {"Messages": []}) == 0


def test_every_error_the_package_raises_pickles() -> None:
    import pickle

    for exc in (
        DynachordError("PUT", "/v1/tasks/t", 400, "callback_not_allowed", "queue 'x' is not one ..."),
        DynachordUnavailable("GET", "/v1/tasks/t", 503, "throttled", "retry"),
        DynachordTimeout("POST", "/v1/tasks/batch-get", 0, "timeout", "the caller's timeout ran out"),
    ):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc)
        assert (back.status, back.code, back.message, str(back)) == (exc.status, exc.code, exc.message, str(exc))


def test_a_result_lifetime_past_the_services_maximum_is_clamped_with_a_warning(
    server: tuple[str, Script], caplog: pytest.LogCaptureFixture
) -> None:
    url, script = server
    too_long = {"error": {"code": "invalid_body", "message": "expires_in too long", "max_expires_in": 2592000}}
    receipt = {"task_id": "t", "status": "SUCCESS", "date_done": None, "expires_at": 1}
    script.answers = [(400, {}, too_long), (200, {}, receipt), (200, {}, receipt)]
    client = Client(url, ClientOptions(**FAST))
    assert client.put_task("t", {"status": "SUCCESS", "expires_in": 31536000}) == receipt
    assert "longer than the service keeps results" in caplog.text
    sent = [json.loads(s["body"])["expires_in"] for s in script.seen]
    assert sent == [31536000, 2592000], "retried once, clamped"
    # Later stores are clamped before they are sent.
    client.put_task("t2", {"status": "SUCCESS", "expires_in": 31536000})
    assert json.loads(script.seen[-1]["body"])["expires_in"] == 2592000


def test_what_the_service_sends_is_routed_to_the_sqs_queue_name_kombu_uses() -> None:
    app = Celery("t", set_as_current=False)
    app.conf.update(
        result_backend="dynachord+http://127.0.0.1:9",
        broker_url="sqs://",
        broker_transport_options={"queue_name_prefix": "dev-"},
        task_default_queue="work",
    )
    backend = app.backend
    chain_body = {
        "task": "celery.chain",
        "kwargs": {"tasks": [{"task": "t.first", "options": {}}, {"task": "t.second", "options": {}}]},
        "options": {"task_id": "c"},
    }
    sig = {
        "task": "t.cb",
        "options": {"task_id": "cb", "link": [{"task": "t.next"}], "link_error": [{"task": "t.err"}]},
    }
    backend._route(sig)
    backend._route(chain_body)
    # The service sends the body, a chain's first task and the errbacks: SQS names.
    assert sig["options"]["queue"] == "dev-work"
    assert sig["options"]["link_error"][0]["options"]["queue"] == "dev-work"
    assert chain_body["kwargs"]["tasks"][0]["options"]["queue"] == "dev-work"
    # The worker sends the rest; kombu adds its prefix then.
    assert sig["options"]["link"][0]["options"]["queue"] == "work"
    assert chain_body["kwargs"]["tasks"][1]["options"]["queue"] == "work"


def test_a_header_whose_chains_end_in_groups_gives_each_part_a_slot_and_the_service_a_shape() -> None:
    from celery import chain, group
    from celery.canvas import _chain
    from celery.exceptions import ChordError

    app = Celery("t", set_as_current=False)
    app.conf.update(result_backend="dynachord+http://127.0.0.1:9", broker_url="memory://")
    s = lambda name: app.signature(f"t.{name}")  # noqa: E731
    backend = app.backend

    def frozen(header: Any, body: Any) -> list[dict[str, Any]]:
        """Freezes the header as chord.run does and hands it to apply_chord;
        the leaves' frozen options, in the order Celery froze them."""
        args = header._freeze_group_tasks(group_id="g", chord=body)
        backend.apply_chord(args, body)
        leaves: list[dict[str, Any]] = []

        def walk(sig: Any) -> None:
            if isinstance(sig, group):
                for t in sig.tasks:
                    walk(t)
            elif isinstance(sig, _chain):
                walk(sig.tasks[-1])
            else:
                leaves.append(sig)

        walk(header)
        return leaves

    # A flat header keeps Celery's group_index as the slot, and no shape.
    body = s("cb")
    leaves = frozen(group(s("a"), s("b")), body)
    assert body["chord_size"] == 2 and "dynachord_header_shape" not in body.options
    # chord([a, b | group(c, d | group(e, f))], cb): four parts, nested.
    body = s("cb")
    leaves = frozen(group(s("a"), chain(s("b"), group(s("c"), chain(s("d"), group(s("e"), s("f")))))), body)
    assert body["chord_size"] == 4
    assert body.options["dynachord_header_shape"] == [None, [None, [None, None]]]
    # Celery gives c, e and f their index in their own group (0, 0, 1), and
    # the chord's id; each reports the slot its task id has.
    for slot, leaf in enumerate(leaves):
        options = leaf.options
        request = Context(id=options["task_id"], group="g", group_index=options.get("group_index"), chord=body)
        stored = backend._store_body(request.id, slot, "SUCCESS", request=request)
        assert stored["group_index"] == slot
        assert stored["chord"]["size"] == 4
        # The service gets the shape, not every part's slot.
        assert "dynachord_header_slots" not in stored["chord"]["callback"]["options"]
        assert stored["chord"]["callback"]["options"]["dynachord_header_shape"] == [None, [None, [None, None]]]
    # Every part's message carries the slots: past their bound, refused before anything is sent.
    with pytest.raises(ChordError, match="make the inner groups chords of their own"):
        frozen(group(chain(s("a"), group([s("b") for _ in range(2000)]))), s("cb"))


def test_the_callers_timeout_bounds_every_call_retries_included() -> None:
    """A service that never answers: each attempt would wait its own read
    timeout (30 s, then 8 retries); the caller's 1.5 s bounds them all."""
    import socket
    import time

    from celery.exceptions import TimeoutError as CeleryTimeout

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = Client(url, ClientOptions(max_retries=8, **FAST))
        started = time.monotonic()
        with pytest.raises(DynachordTimeout):
            client.batch_get(["a", "b"], wait=0.0, deadline=time.monotonic() + 1.5)
        assert time.monotonic() - started < 3
        app = Celery(set_as_current=False)
        app.conf.result_backend = f"dynachord+{url}"
        app.conf.result_backend_transport_options = {"max_retries": 8, **FAST}
        backend = app.backend
        for wait in (
            lambda: list(backend.get_many(["a", "b"], timeout=1.5)),
            lambda: backend.wait_for("a", timeout=1.5),
        ):
            started = time.monotonic()
            with pytest.raises(CeleryTimeout):
                wait()
            assert time.monotonic() - started < 3, "bounded by the caller's timeout, not the retries'"
    finally:
        silent.close()


def test_results_a_batch_get_answers_with_references_are_read_on_their_own(server: tuple[str, Script]) -> None:
    url, script = server
    whole = {"status": "SUCCESS", "result": "x" * 1000, "task_id": "b"}
    reference = {"task_id": "b", "status": "SUCCESS", "ref": {"bytes": 1040}}
    script.answers = [
        (200, {}, {"results": [{"status": "SUCCESS", "result": 1, "task_id": "a"}, reference]}),
        (200, {}, whole),
    ]
    client = Client(url, ClientOptions(**FAST))
    assert client.batch_get(["a", "b"]) == [{"status": "SUCCESS", "result": 1, "task_id": "a"}, whole]
    assert [(s["method"], s["path"]) for s in script.seen] == [("POST", "/v1/tasks/batch-get"), ("GET", "/v1/tasks/b")]


def test_a_large_result_is_uploaded_then_committed_and_read_back_from_its_url(server: tuple[str, Script]) -> None:
    import gzip
    import hashlib

    url, script = server
    result = {"rows": ["r" * 100] * 20}
    text = json.dumps(result, separators=(",", ":")).encode()
    grant = {"task_id": "t", "method": "PUT", "url": f"{url}/bucket/key", "headers": {"x-amz-tagging": "k=v"}}
    script.answers = [
        (200, {}, grant),
        (503, {}, None),  # S3 briefly unavailable: sent again
        (200, {}, None),
        (200, {}, {"task_id": "t", "status": "SUCCESS", "date_done": None, "expires_at": 1}),
        (200, {}, {"status": "SUCCESS", "result": None, "result_ref": {"url": f"{url}/get", "encoding": "gzip"}}),
        (200, {}, gzip.compress(text)),
    ]
    client = Client(url, ClientOptions(upload_above=1000, **FAST))
    assert client.put_task("t", {"status": "SUCCESS", "result": result}) is not None
    ask, first, put, commit = script.seen[:4]
    object_ = gzip.decompress(put["body"])
    assert json.loads(object_) == result
    sha = hashlib.sha256(put["body"]).hexdigest()
    assert json.loads(ask["body"]) == {"sha256": sha, "bytes": len(put["body"])}
    assert (first["path"], put["path"], put["headers"]["x-amz-tagging"]) == ("/bucket/key", "/bucket/key", "k=v")
    assert json.loads(commit["body"]) == {"status": "SUCCESS", "result_upload": {"sha256": sha}}
    assert client.get_task("t") == {"status": "SUCCESS", "result": result}
    assert [s["path"] for s in script.seen[4:]] == ["/v1/tasks/t", "/get"]


def test_a_meta_too_large_without_its_result_uploads_its_large_fields_together(server: tuple[str, Script]) -> None:
    """result_extended arguments of megabytes: the meta is too large even
    without its result, so result, args and kwargs go to S3 as one object."""
    import gzip
    import hashlib

    url, script = server
    meta = {"status": "SUCCESS", "result": 3, "name": "t.big", "args": ["a" * 2000], "kwargs": {"k": 1}}
    grant = {"task_id": "t", "method": "PUT", "url": f"{url}/bucket/key", "headers": {}}
    fields = {"result": 3, "args": ["a" * 2000], "kwargs": {"k": 1}}
    script.answers = [
        (200, {}, grant),
        (200, {}, None),
        (200, {}, {"task_id": "t", "status": "SUCCESS", "date_done": None, "expires_at": 1}),
        (200, {}, {"status": "SUCCESS", "result": None, "name": "t.big",
                   "result_ref": {"url": f"{url}/get", "encoding": "gzip", "fields": True}}),
        (200, {}, gzip.compress(json.dumps(fields).encode())),
    ]  # fmt: skip
    client = Client(url, ClientOptions(upload_above=1000, **FAST))
    assert client.put_task("t", meta) is not None
    put, commit = script.seen[1:3]
    assert json.loads(gzip.decompress(put["body"])) == fields
    sha = hashlib.sha256(put["body"]).hexdigest()
    assert json.loads(commit["body"]) == {"status": "SUCCESS", "name": "t.big",
                                          "result_upload": {"sha256": sha, "fields": True}}  # fmt: skip
    assert client.get_task("t") == meta, "read back whole, arguments too"


def test_a_failure_with_a_traceback_of_megabytes_uploads_it_with_the_large_fields(
    server: tuple[str, Script],
) -> None:
    """A traceback too large to send goes to S3 with the result (the
    exception), as one object, rather than being refused with 413."""
    import gzip

    url, script = server
    exc = {"exc_type": "RecursionError", "exc_message": ["deep"], "exc_module": "builtins"}
    meta = {"status": "FAILURE", "result": exc, "traceback": "  File x, line 1\n" * 200}
    grant = {"task_id": "t", "method": "PUT", "url": f"{url}/bucket/key", "headers": {}}
    script.answers = [
        (200, {}, grant),
        (200, {}, None),
        (200, {}, {"task_id": "t", "status": "FAILURE", "date_done": None, "expires_at": 1}),
    ]
    client = Client(url, ClientOptions(upload_above=1000, **FAST))
    assert client.put_task("t", meta) is not None
    put, commit = script.seen[1:3]
    assert json.loads(gzip.decompress(put["body"])) == {"result": exc, "traceback": meta["traceback"]}
    committed = json.loads(commit["body"])
    assert "traceback" not in committed and committed["result_upload"]["fields"] is True
    # A deployment without a results bucket still takes a meta that fits a request.
    script.answers = [
        (400, {}, {"error": {"code": "large_results_disabled", "message": "no results bucket (RESULTS_BUCKET)"}}),
        (200, {}, {"task_id": "t", "status": "FAILURE", "date_done": None, "expires_at": 1}),
    ]
    client = Client(url, ClientOptions(**FAST))
    # Past the 256 KB that fit the item however they compress, under the request's limit.
    meta = dict(meta, traceback="  File x, line 1\n" * 20_000)
    assert client.put_task("t", meta) is not None
    sent = json.loads(script.seen[-1]["body"])
    assert sent["traceback"] == meta["traceback"] and "result_upload" not in sent


def test_a_large_result_with_small_arguments_uploads_the_result_alone(server: tuple[str, Script]) -> None:
    import gzip

    url, script = server
    grant = {"task_id": "t", "method": "PUT", "url": f"{url}/bucket/key", "headers": {}}
    script.answers = [(200, {}, grant), (200, {}, None), (200, {}, {"task_id": "t", "status": "SUCCESS"})]
    client = Client(url, ClientOptions(upload_above=1000, **FAST))
    client.put_task("t", {"status": "SUCCESS", "result": "r" * 2000, "args": [1], "kwargs": {}})
    assert json.loads(gzip.decompress(script.seen[1]["body"])) == "r" * 2000
    assert json.loads(script.seen[2]["body"])["args"] == [1]
    assert "fields" not in json.loads(script.seen[2]["body"])["result_upload"]


def test_a_large_saved_group_is_uploaded_then_committed_and_read_back(server: tuple[str, Script]) -> None:
    import gzip
    import hashlib

    url, script = server
    result = [["g", None], [[[f"task-{i}", None], None] for i in range(100)]]
    grant = {"group_id": "g", "method": "PUT", "url": f"{url}/bucket/key", "headers": {}}
    script.answers = [
        (200, {}, grant),
        (200, {}, None),
        (200, {}, {"group_id": "g", "expires_at": 1}),
        (200, {}, {"result": None, "result_ref": {"url": f"{url}/get", "encoding": "gzip"}}),
        (200, {}, gzip.compress(json.dumps(result).encode())),
    ]
    client = Client(url, ClientOptions(upload_above=1000, **FAST))
    client.save_group("g", result, expires_in=60)
    ask, put, commit = script.seen[:3]
    assert (ask["method"], ask["path"]) == ("POST", "/v1/groups/g/upload")
    assert json.loads(gzip.decompress(put["body"])) == result
    sha = hashlib.sha256(put["body"]).hexdigest()
    assert (commit["method"], commit["path"]) == ("PUT", "/v1/groups/g")
    assert json.loads(commit["body"]) == {"expires_in": 60, "result_upload": {"sha256": sha}}
    assert client.get_group("g") == {"result": result}
    assert [s["path"] for s in script.seen[3:]] == ["/v1/groups/g", "/get"]


def test_a_small_result_goes_in_the_request(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(200, {}, {"task_id": "t", "status": "SUCCESS", "date_done": None, "expires_at": 1})]
    Client(url, ClientOptions(**FAST)).put_task("t", {"status": "SUCCESS", "result": "x" * 1000})
    assert [(s["method"], s["path"]) for s in script.seen] == [("PUT", "/v1/tasks/t")]
    assert json.loads(script.seen[0]["body"])["result"] == "x" * 1000


def test_a_chord_callbacks_reference_to_its_results_is_resolved_before_it_runs(server: tuple[str, Script]) -> None:
    from celery import signals
    from dynachord_celery.backend import RESULTS_REF

    url, script = server
    app = Celery("t", backend=f"dynachord+{url}")
    app.conf.result_backend_transport_options = FAST

    def callback(values: Any, tag: str) -> Any:
        return values

    # Not under the run-once guard, whose claim is another request.
    task = app.task(callback, name="t.cb", run_once=False)
    script.answers = [(200, {}, {"status": "SUCCESS", "result": [1, 2, 3], "task_id": "ref"})]
    args: list[Any] = [{RESULTS_REF: {"task_id": "ref", "bytes": 7}}, "own"]
    task.push_request(args=args, origin="dynachord@chord-join")
    try:
        signals.task_prerun.send(sender=task, task_id="cb", task=task, args=args, kwargs={})
        assert args == [[1, 2, 3], "own"], "the callback runs with the results"
        assert task.request.args == [{RESULTS_REF: {"task_id": "ref", "bytes": 7}}, "own"], "its meta keeps the ref"
    finally:
        task.pop_request()
    assert [s["path"] for s in script.seen] == ["/v1/tasks/ref"]
    # Anything else is left as it is.
    other: list[Any] = [{"dynachord_ref": 1}]
    signals.task_prerun.send(sender=task, task_id="x", task=task, args=other, kwargs={})
    assert other == [{"dynachord_ref": 1}]
    # A reference in a message the service did not send (any client can
    # call a task with it) is an argument like any other: nothing is read.
    forged: list[Any] = [{RESULTS_REF: {"task_id": "someone-elses", "bytes": 7}}, "own"]
    for origin in (None, "gen123@laptop"):
        task.push_request(args=forged, origin=origin)
        try:
            signals.task_prerun.send(sender=task, task_id="t", task=task, args=forged, kwargs={})
        finally:
            task.pop_request()
        assert forged == [{RESULTS_REF: {"task_id": "someone-elses", "bytes": 7}}, "own"]
    assert [s["path"] for s in script.seen] == ["/v1/tasks/ref"], "no other read"


def test_an_errback_of_a_failed_chord_is_called_new_style_when_celery_would() -> None:
    from celery import signals
    from celery.exceptions import ChordError
    from dynachord_celery.backend import CHORD_ERROR_HEADER

    app = Celery("t", backend="dynachord+http://127.0.0.1:9")
    info = {
        "id": "cb",
        "task": "t.sum",
        "args": [7],
        "kwargs": {},
        "errbacks": [],
        "immutable": False,
        "exc": {
            "exc_type": "ChordError",
            "exc_message": ["Dependency p1 raised ValueError('x')"],
            "exc_module": "celery.exceptions",
        },
    }

    def new_style(request: Any, exc: Any, traceback: Any, note: str) -> None: ...
    def old_style(task_id: str, note: str) -> None: ...
    def bound(self: Any, request: Any, exc: Any, traceback: Any) -> None: ...

    def prerun(fn: Any, args: list[Any], header: dict[str, Any] | None = None, **task_options: Any) -> Any:
        task = app.task(fn, name=f"t.{fn.__name__}", **task_options)
        task.push_request(args=args, **({CHORD_ERROR_HEADER: header} if header else {}))
        try:
            signals.task_prerun.send(sender=task, task_id="e", task=task, args=args, kwargs={})
            return task.request.args
        finally:
            task.pop_request()

    args: list[Any] = ["cb", "n"]
    assert prerun(new_style, args, info) == ["cb", "n"], "the errback's meta keeps the args as sent"
    request, exc, traceback, note = args
    assert (request.id, request.task, request.args, traceback, note) == ("cb", "t.sum", [7], None, "n")
    assert isinstance(exc, ChordError) and "Dependency p1 raised" in str(exc)
    # An old-style one, a bound one and an immutable one run as sent, and so
    # does any task the service did not send as a chord's errback.
    for fn, sent, header, options in [
        (old_style, ["cb", "n"], info, {}),
        (bound, ["cb"], info, {"bind": True}),
        (new_style, ["a", "b", "c", "d"], dict(info, immutable=True), {}),
        (new_style, ["cb", "n"], None, {}),
    ]:
        args = list(sent)
        prerun(fn, args, header, **options)
        assert args == sent, fn


def test_a_get_or_delegate_sent_again_keeps_its_request_id(server: tuple[str, Script]) -> None:
    from dynachord_celery.cache import ProcessingCache

    url, script = server
    app = Celery("t", backend=f"dynachord+{url}")
    app.conf.result_backend_transport_options = FAST
    cache = ProcessingCache(app)

    @cache.operation("thumb")
    def thumb(uri: str, context: Any) -> str:
        return uri

    answer = {"op": "thumb", "uri": "u", "state": "processing", "task_id": "dcache-x", "delegated": True, "waiters": 1}
    script.answers = [(500, {}, {"error": {"code": "internal", "message": "x"}}), (200, {}, answer)]
    assert cache.get_or_delegate("thumb", "u", cb_args=1).task_id == "dcache-x"
    ids = [json.loads(seen["body"])["request_id"] for seen in script.seen]
    assert len(ids) == 2 and ids[0] == ids[1], "the repeat carries the same id"
    script.answers = [(200, {}, answer)]
    cache.get_or_delegate("thumb", "u", cb_args=1)
    assert json.loads(script.seen[-1]["body"])["request_id"] != ids[0], "a new request, a new id"


def test_a_chords_status_asks_for_the_failed_ids_only_when_told(server: tuple[str, Script]) -> None:
    url, script = server
    counts = {"size": 3, "done": 2, "succeeded": 1, "failed": 1, "pending": 1, "state": "open"}
    script.answers = [(200, {}, counts), (200, {}, {**counts, "failed_ids": ["p1"], "failed_ids_truncated": False})]
    client = Client(url, ClientOptions(**FAST))
    assert client.chord("c 1") == counts
    assert client.chord("c 1", failed_ids=True)["failed_ids"] == ["p1"]
    assert [seen["path"] for seen in script.seen] == ["/v1/chords/c%201", "/v1/chords/c%201?failed_ids=true"]


def test_a_failed_parts_exception_is_told_apart_from_a_result() -> None:
    from dynachord_celery import is_failure

    assert is_failure({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"})
    for result in [1, "exc_type", None, [], {"exc_type": 3, "exc_message": []}, {"exc_type": "X"}]:
        assert not is_failure(result), result


def test_a_redrive_names_the_sqs_transports_queue_prefix_and_a_refusal_says_why(server: tuple[str, Script]) -> None:
    url, script = server
    app = Celery("t", set_as_current=False)
    app.conf.update(
        result_backend=f"dynachord+{url}",
        broker_url="sqs://",
        broker_transport_options={"queue_name_prefix": "dev-"},
        result_backend_transport_options=FAST,
    )
    answer = {"group_id": "c 1", "state": "redriving", "redriving": 3, "redrives": 1}
    refused = {"error": {"code": "redrive_refused", "message": "chord c 1 has no failed part to redrive"}}
    script.answers = [(202, {}, answer), (409, {}, refused)]
    assert app.backend.redrive_chord("c 1") == answer
    with pytest.raises(DynachordError) as err:
        app.backend.redrive_chord("c 1", queue="fix")
    assert (err.value.code, err.value.status) == ("redrive_refused", 409)
    assert [(seen["method"], seen["path"]) for seen in script.seen] == [("POST", "/v1/chords/c%201/redrive")] * 2
    assert [json.loads(seen["body"]) for seen in script.seen] == [
        {"queue_prefix": "dev-"},
        {"queue": "fix", "queue_prefix": "dev-"},
    ]


def test_the_run_once_guard_claims_before_a_run_and_refuses_a_ready_or_held_task(server: tuple[str, Script]) -> None:
    from celery import signals, states
    from dynachord_celery import AlreadyRan, RunDeferred
    from dynachord_celery.run_once import guard

    url, script = server
    app = Celery("t", backend=f"dynachord+{url}")
    app.conf.result_backend_transport_options = FAST

    def work() -> str:
        return "ran"

    app.task(work, name="t.guarded", run_once=True, run_once_lease=9)
    app.task(work, name="t.plain")
    app.task(work, name="t.opted_out", run_once=False)
    guarded, plain, opted_out = (app.tasks[f"t.{name}"] for name in ("guarded", "plain", "opted_out"))
    for task in (guarded, plain, opted_out):
        guard(task)

    def attempt(task: Any, task_id: str, origin: str | None = None) -> BaseException | None:
        """The worker's steps before the body: prerun, track_started, before_start."""
        task.push_request(id=task_id, origin=origin, hostname="w1")
        try:
            signals.task_prerun.send(sender=task, task_id=task_id, task=task, args=[], kwargs={})
            task.backend.store_result(task_id, {"pid": 1}, states.STARTED, request=task.request)
            try:
                task.before_start(task_id, [], {})
            except BaseException as exc:
                return exc
            # What the task stores while it runs renews the claim; RETRY gives it up.
            task.backend.store_result(task_id, {"step": 1}, "PROGRESS", request=task.request)
            task.backend.store_result(task_id, None, states.RETRY, request=task.request)
            return None
        finally:
            signals.task_postrun.send(sender=task, task_id=task_id, task=task)
            task.pop_request()

    ok = {"task_id": "x", "status": "STARTED"}
    script.answers = [(200, {}, ok)] * 3
    assert attempt(guarded, "g1") is None
    bodies = [json.loads(s["body"]) for s in script.seen]
    assert [b["status"] for b in bodies] == ["STARTED", "PROGRESS", "RETRY"], "track_started's store was the claim"
    token = bodies[0]["claim"]["token"]
    assert bodies[0]["claim"] == {"token": token, "lease_seconds": 9}
    assert bodies[1]["claim"] == bodies[0]["claim"], "a store while it runs renews the same claim"
    assert "claim" not in bodies[2], "RETRY gives the claim up for the retry's delivery"

    script.seen.clear()
    script.answers = [(409, {}, {"error": {"code": "state_conflict", "message": "m", "stored_status": "SUCCESS"}})]
    refused = attempt(guarded, "g2")
    assert isinstance(refused, AlreadyRan) and refused.status == "SUCCESS"
    assert len(script.seen) == 1, "a refused run stores nothing of its own"

    script.seen.clear()
    held = {"code": "task_claimed", "message": "m", "stored_status": "STARTED", "claim_expires_in": 7.5}
    script.answers = [(409, {}, {"error": held})]
    deferred = attempt(guarded, "g3")
    assert isinstance(deferred, RunDeferred) and deferred.retry_in == 7.5
    assert len(script.seen) == 1

    # Unguarded: Celery's own stores, without a claim; what the service
    # sends is guarded unless its task opts out.
    script.seen.clear()
    script.answers = [(200, {}, ok)] * 6
    assert attempt(plain, "p1") is None
    assert attempt(opted_out, "o1", origin="dynachord@chord-join") is None
    assert all("claim" not in json.loads(s["body"]) for s in script.seen)
    script.seen.clear()
    script.answers = [(200, {}, ok)] * 3
    assert attempt(plain, "p2", origin="dynachord@chord-join") is None
    assert "claim" in json.loads(script.seen[0]["body"])


def test_a_claim_the_service_cannot_take_now_defers_the_run_and_one_it_refuses_runs_unguarded(
    server: tuple[str, Script],
) -> None:
    from celery import signals
    from dynachord_celery import RunDeferred
    from dynachord_celery.backend import RUN_ATTR
    from dynachord_celery.run_once import guard

    url, script = server
    app = Celery("t", backend=f"dynachord+{url}")
    app.conf.result_backend_transport_options = dict(FAST, max_retries=1)
    app.conf.dynachord_run_once = True

    def work() -> str:
        return "ran"

    app.task(work, name="t.work")
    task = app.tasks["t.work"]
    guard(task)

    def prerun(task_id: str) -> Any:
        task.push_request(id=task_id, hostname="w1")
        try:
            signals.task_prerun.send(sender=task, task_id=task_id, task=task, args=[], kwargs={})
            try:
                task.before_start(task_id, [], {})
            except RunDeferred as exc:
                return exc
            return getattr(task.request, RUN_ATTR, None)
        finally:
            signals.task_postrun.send(sender=task, task_id=task_id, task=task)
            task.pop_request()

    unavailable = (503, {"Retry-After": "0"}, {"error": {"code": "unavailable", "message": "down"}})
    script.answers = [unavailable] * 2
    assert isinstance(prerun("u1"), RunDeferred), "unreachable: not run now, its message comes back"
    # An old service that does not know claims: the task runs, unguarded.
    old = (400, {}, {"error": {"code": "invalid_meta", "message": "unknown field `claim`"}})
    script.answers = [old]
    assert prerun("o1") is None, "no claim is held, and the task's stores are Celery's own"
