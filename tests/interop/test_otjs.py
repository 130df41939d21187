"""Interop with a client nobody here wrote: ot.js (npm ``ot`` 0.0.15) over Node's ``ws``.

tests/interop/node/ot_clients.js runs three editors built on ot.js's own
``Client`` and ``TextOperation``, with ``?units=utf16`` (ot.js counts UTF-16
code units), against this process's server; a Python editor counting code
points joins them.  Every copy must end identical to the server's, and the
three concurrent inserts at one place must be ordered by the tie rule of
docs/PROTOCOL.md (the op the server received later goes first).

The node packages are pinned in tests/interop/node/package-lock.json and
installed with ``npm ci`` (scripts/test.sh does it; so does the fixture below
when they are missing).  Without node or npm the test skips -- unless
``CI=true``, where that is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_editing import Editor, fetch_json, op_of, open_editor

NODE_DIR = Path(__file__).with_name("node")
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason + " (CI=true: the interop test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node_packages() -> Path:
    """tests/interop/node with its locked packages installed (``npm ci`` if needed)."""
    if shutil.which("node") is None:
        unavailable("node is not installed")
    lock = NODE_DIR / "package-lock.json"
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        if shutil.which("npm") is None:
            unavailable("npm is not installed (needed once: npm ci in tests/interop/node)")
        try:
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True,
                           capture_output=True, text=True, timeout=180)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            unavailable("npm ci failed in tests/interop/node: %s" % (getattr(exc, "stderr", "") or exc))
    for package, version in (("ot", "0.0.15"), ("ws", None)):
        meta = json.loads((NODE_DIR / "node_modules" / package / "package.json").read_text())
        assert version is None or meta["version"] == version, meta["version"]
    return NODE_DIR


class NodeRun:
    """The node process; its stdout is one JSON event per line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise AssertionError("node exited (%s): %s" % (await self.proc.wait(), await self.stderr()))
        event = json.loads(line)
        assert event["event"] != "fatal", event["message"]
        assert event["event"] == name, event
        return event

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode(errors="replace")[-2000:]

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def synchronized(ed: Editor, rev: int | None = None, timeout: float = 10.0) -> None:
    """Process messages until ``ed`` has nothing unacknowledged (and is at ``rev``, if given)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while ed.ot.state != "synchronized" or (rev is not None and ed.ot.rev != rev):
        await ed.pump(max(0.01, deadline - loop.time()))
    assert not ed.errors, ed.errors


def random_edit(ed: Editor, rng: random.Random) -> None:
    size = len(ed.text)
    pos = rng.randint(0, size)
    if size > pos and rng.random() < 0.3:
        k = rng.randint(1, min(3, size - pos))
        ed.edit(op_of(pos, -k, size - pos - k))
    else:
        s = "".join(rng.choice(["y", "😀", "中", "👍🏽", " ", "🇯🇵", "é"]) for _ in range(rng.randint(1, 3)))
        ed.edit(op_of(pos, s, size - pos))


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("app_options", [{"edit_rate": 0, "rate_limit": 0}])  # the editors type fast
async def test_otjs_clients_and_a_python_client_converge(node_packages, connect, http_port, app_options):
    cfg = {"base": "127.0.0.1:%d" % http_port, "doc": "interop", "edits": 40, "seed": 7, "timeoutMs": 40000}
    proc = await asyncio.create_subprocess_exec(
        "node", "ot_clients.js", json.dumps(cfg), cwd=str(node_packages),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    run = NodeRun(proc)
    try:
        # 1. Three concurrent inserts at one place (after the emoji): all copies agree, and
        # the insert the server received later comes first (ot.js's and ShareDB's rule).
        tie = await run.event("tie")
        assert tie["texts"] == [tie["server"]] * 3, tie
        by_arrival = [s for _, s in sorted(zip(tie["ackRevs"], tie["inserted"]))]
        assert sorted(tie["ackRevs"]) == [tie["rev"] - 2, tie["rev"] - 1, tie["rev"]]
        assert tie["server"] == "😀" + "".join(reversed(by_arrival)) + " ties go here: "

        # 2. A Python editor counting code points edits while the ot.js editors do.
        py = await open_editor(connect, doc="interop", name="py")
        assert py.first["units"] == "codepoint"
        edited = asyncio.ensure_future(run.event("edited"))
        rng = random.Random(3)
        edits = 0
        while not edited.done() or edits < 20:
            random_edit(py, rng)
            edits += 1
            for _ in range(rng.randint(0, 3)):
                try:
                    await py.pump(0.003)
                except asyncio.TimeoutError:
                    break
        assert (await edited)["edits"] == 120
        await synchronized(py)

        # 3. Nobody edits any more: every copy is the server's text.
        assert proc.stdin is not None
        proc.stdin.write(b"done\n")
        await proc.stdin.drain()
        proc.stdin.close()
        final = await run.event("final")
        server = await fetch_json(http_port, "/api/docs/interop")
        assert final["server"]["rev"] == server["rev"] and final["server"]["text"] == server["text"]
        for client in final["clients"]:
            assert client["errors"] == [], client
            assert client["synchronized"] and client["revision"] == server["rev"], client
            assert client["text"] == server["text"], client["name"]
        await synchronized(py, server["rev"])
        assert py.text == server["text"]
        assert server["rev"] > tie["rev"] + 20  # many ops, not a few composed ones
        assert any(ord(ch) > 0xFFFF for ch in server["text"]) and "中" in server["text"]
        assert await asyncio.wait_for(proc.wait(), 10) == 0, await run.stderr()
    finally:
        run.kill()
