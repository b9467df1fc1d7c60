"""The subject table: every name documented, subjects unique and valid, ids validated."""

from __future__ import annotations

import ast
import inspect
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xllm.protocol import subjects

# Constants that name something other than a subject, by suffix.
NOT_SUBJECTS = ("_QUEUE", "_STREAM", "_CONSUMER", "_WINDOW")


def _module_tree() -> ast.Module:
    return ast.parse(inspect.getsource(subjects))


def _public_constants() -> dict[str, str]:
    return {
        name: value
        for name, value in vars(subjects).items()
        if name.isupper() and not name.startswith("_") and isinstance(value, str)
    }


def test_every_public_constant_has_a_docstring():
    body = _module_tree().body
    documented = set()
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.Assign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            documented.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
    assert set(_public_constants()) <= documented


def test_every_public_function_has_a_docstring():
    functions = [
        fn
        for name, fn in vars(subjects).items()
        if inspect.isfunction(fn)
        and not name.startswith("_")
        and fn.__module__ == subjects.__name__
    ]
    assert {f.__name__ for f in functions} >= {"instance_cmd", "request_output", "token"}
    for fn in functions:
        assert inspect.getdoc(fn), f"{fn.__name__} has no docstring"


def test_docstrings_say_sender_and_receiver():
    """Subjects' docstrings name who sends to whom (an arrow)."""
    tree = _module_tree()
    docs = {}
    for stmt, nxt in itertools.pairwise(tree.body):
        if isinstance(stmt, ast.Assign) and isinstance(nxt, ast.Expr):
            docs[stmt.targets[0].id] = nxt.value.value
    for name in _public_constants():
        if not name.endswith(NOT_SUBJECTS):
            assert "→" in docs[name], name
    for fn in (subjects.instance_cmd, subjects.request_output):
        assert "→" in fn.__doc__


def test_subjects_are_unique_and_valid():
    subject_values = [v for n, v in _public_constants().items() if not n.endswith(NOT_SUBJECTS)]
    assert len(subject_values) == len(set(subject_values))
    for value in subject_values:
        assert value.startswith("xllm.")
        for part in value.split("."):
            subjects.token(part)  # no wildcards, no empty tokens


def test_queue_groups_are_unique():
    queues = [v for n, v in _public_constants().items() if n.endswith("_QUEUE")]
    assert len(queues) == len(set(queues)) >= 2


def test_required_subjects():
    assert subjects.SCHED_SUBMIT == "xllm.sched.submit"
    assert subjects.HEARTBEAT == "xllm.inst.heartbeat"
    assert subjects.KV_EVENTS == "xllm.kv.events"
    assert subjects.KV_MATCH == "xllm.kv.match"
    assert subjects.CLUSTER_STATE == "xllm.sched.cluster"
    assert subjects.OFFLINE_SUBMIT == "xllm.offline.submit"
    assert subjects.OFFLINE_STREAM == "XLLM_OFFLINE"
    assert subjects.instance_cmd("inst-0") == "xllm.inst.inst-0.cmd"
    assert subjects.request_output("chatcmpl-42") == "xllm.req.chatcmpl-42.out"


def test_built_subjects_do_not_collide_with_constants():
    constants = set(_public_constants().values())
    for token in ("heartbeat", "submit", "events", "cmd", "out"):
        assert subjects.instance_cmd(token) not in constants
        assert subjects.request_output(token) not in constants


@pytest.mark.parametrize(
    "bad", ["", "a.b", "a*", ">", "a b", "tab\there", "new\nline", "nul\x00", "\x7f", 5, None]
)
def test_bad_tokens_are_refused(bad):
    with pytest.raises(ValueError):
        subjects.token(bad)
    with pytest.raises(ValueError):
        subjects.instance_cmd(bad)
    with pytest.raises(ValueError):
        subjects.request_output(bad)


@given(st.text(min_size=1).filter(lambda s: not any(c in s for c in ".*>") and s.isprintable()))
def test_good_tokens_pass_through_unchanged(value):
    if any(c.isspace() for c in value):
        return
    assert subjects.token(value) == value
    assert subjects.request_output(value) == f"xllm.req.{value}.out"
