"""static/js/ot.js gives the same answers as realtime/ot.py (runs node; skipped without it,
except under CI=true, where a missing node is a failure).

One node process (tests/unit/ot_js_driver.mjs) serves the whole module: each
example is one JSON line there and back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime import ot
from realtime.ot import OTError

from .test_documents import run_simulation
from .test_ot import ALPHABET, ops_on, texts

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None and os.environ.get("CI", "").lower() != "true", reason="node is not installed"
)

DRIVER = Path(__file__).with_name("ot_js_driver.mjs")
SETTINGS = settings(max_examples=50, deadline=None)


class Node:
    """A node process running the driver; ``run(cases)`` -> results."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["node", str(DRIVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # read only once it has died: no deadlock
            text=True,
            encoding="utf-8",
        )

    def run(self, cases: list[tuple[str, list]]) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([{"fn": fn, "args": args} for fn, args in cases]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise RuntimeError("node driver died: " + self.proc.stderr.read())
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    proc = Node()
    yield proc
    proc.close()


# Python reference for each driver function (JSON turns tuples into lists).
def _utf16_len(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


def _utf16_to_cp(s: str, i: int) -> int:
    units = 0
    for k, ch in enumerate(s):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > i:
            return k
    return len(s)


PYTHON: dict[str, Callable[..., Any]] = {
    "check": ot.check,
    "lengths": ot.lengths,
    "apply": ot.apply,
    "compose": ot.compose,
    "transform": ot.transform,
    "transformIndex": lambda index, op, own: ot.transform_index(index, op, own=own),
    "diffToOp": ot.diff_to_op,
    "cpLength": len,
    "utf16ToCp": _utf16_to_cp,
    "cpToUtf16": lambda s, cp: _utf16_len(s[:cp]),
}


def python_result(fn: str, args: list) -> dict[str, Any]:
    try:
        return {"ok": json.loads(json.dumps(PYTHON[fn](*args)))}
    except OTError as exc:
        return {"error": "OTError", "message": str(exc)}


def assert_same(node: Node, cases: list[tuple[str, Any]]) -> None:
    for (fn, args), js in zip(cases, node.run(cases)):
        py = python_result(fn, args)
        assert js.keys() == py.keys(), (fn, args, py, js)
        if "error" in py:
            assert js["error"] == "OTError", (fn, args, js)
        else:
            assert js["ok"] == py["ok"], (fn, args)


@SETTINGS
@given(st.data())
def test_functions_agree(node: Node, data: st.DataObject) -> None:
    text = data.draw(texts)
    a = data.draw(ops_on(len(text)))
    b = data.draw(ops_on(len(text)))
    middle = ot.apply(text, a)
    c = data.draw(ops_on(len(middle)))
    other = data.draw(texts)
    index = data.draw(st.integers(0, len(text)))
    own = data.draw(st.booleans())
    assert_same(
        node,
        [
            ("check", [a]),
            ("lengths", [c]),
            ("apply", [text, a]),
            ("apply", [middle, c]),
            ("apply", [text, c]),  # usually the wrong length: both must refuse
            ("compose", [a, c]),
            ("compose", [a, b]),
            ("transform", [a, b]),
            ("transform", [b, a]),
            ("transform", [a, c]),
            ("transformIndex", [index, a, own]),
            ("transformIndex", [len(text) + 1, a, own]),
            ("diffToOp", [text, other]),
            ("diffToOp", [other + text, other + middle]),
            ("cpLength", [text]),
        ],
    )


@SETTINGS
@given(texts, st.integers(0, 60))
def test_utf16_conversions_agree(node: Node, text: str, n: int) -> None:
    unit = min(n, _utf16_len(text))
    cp = min(n, len(text))
    assert_same(node, [("utf16ToCp", [text, unit]), ("cpToUtf16", [text, cp]), ("cpLength", [text])])


def test_conversions_around_surrogate_pairs(node: Node) -> None:
    cases = [
        ("cpLength", ["a😀b"]),
        ("utf16ToCp", ["a😀b", 2]),  # between the halves: rounds down to the pair
        ("utf16ToCp", ["a😀b", 3]),
        ("cpToUtf16", ["a😀b", 2]),
        ("diffToOp", ["😀", "👍"]),  # same high surrogate: never split the pair
        ("diffToOp", ["x🏽", "y🏽"]),
        ("diffToOp", ["a😀😀b", "a😀b"]),
    ]
    assert_same(node, cases)
    results = node.run([("cpToUtf16", ["ab", 3]), ("utf16ToCp", ["ab", 3]), ("cpToUtf16", ["😀", 2])])
    assert [r.get("error") for r in results] == ["RangeError"] * 3


def test_bad_ops_are_refused_alike(node: Node) -> None:
    bad: list[Any] = ["abc", {"r": 1}, None, [0], [""], [True], [1.5], [None], [[1]], ["\ud800"], ["x\udc00"]]
    cases = [("check", [op]) for op in bad]
    cases += [("apply", ["abc", op]) for op in ([2], [4], [], [1, 0], [False, 3])]
    cases += [("compose", [[1, "x"], [1]]), ("transform", [[1], [2]])]
    cases += [("transformIndex", [index, [3], False]) for index in (-1, 4, 1.5)]
    for (fn, args), js in zip(cases, node.run(cases)):
        assert "error" in python_result(fn, args), (fn, args)
        assert js.get("error") == "OTError", (fn, args, js)


CAMEL = {
    "apply_client": "applyClient",
    "apply_server": "applyServer",
    "server_ack": "serverAck",
    "is_own": "isOwn",
    "pending": "pending",
    "resend": "resend",
}


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_js_client_replays_the_python_clients(node: Node, data: st.DataObject) -> None:
    """Each simulated client's calls, replayed on the JS OTClient, give the same results and states."""
    sim = run_simulation(data, record=True)
    cases = []
    for client in sim.clients:
        assert client.trace is not None
        calls = [[CAMEL[method], args] for method, args, _, _ in client.trace]
        cases.append(("client", [0, client.id, calls]))
    for client, js in zip(sim.clients, node.run(cases)):
        assert "ok" in js, js
        assert client.trace is not None
        expected = [[result, state] for _, _, result, state in client.trace]
        assert js["ok"] == json.loads(json.dumps(expected))


def test_js_client_example(node: Node) -> None:
    calls = [
        ["applyClient", [["x"]]],
        ["applyClient", [[1, "y"]]],
        ["applyServer", [["S"]]],
        ["serverAck", [7]],
        ["serverAck", [1]],
        ["pending", []],
        ["serverAck", [None]],
        ["pending", []],
    ]
    (js,) = node.run([("client", [3, "me", calls])])
    results = [result for result, _ in js["ok"]]
    # our pending "x" and buffered "y" go before the server's "S" on the tie (ot.js's rule)
    assert results == [True, False, [2, "S"], None, [1, "y", 1], [5, [1, "y", 1], 2], None, None]
    assert js["ok"][-1][1] == [6, None, None, None, 3]


def test_alphabet_has_astral_characters() -> None:
    assert any(_utf16_len(ch) == 2 for ch in ALPHABET)
