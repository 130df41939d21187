"""ot.js clients (npm ``ot`` 0.0.15, unchanged) editing one document through
two nodes of a cluster: the tie rule and convergence hold across nodes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.cluster.test_chat_cluster import http, run
from tests.interop.test_otjs import NodeRun, node_packages  # noqa: F401  (fixture)

pytestmark = pytest.mark.cluster


def test_otjs_clients_on_two_nodes_converge(cluster: Any, node_packages: Any) -> None:  # noqa: F811
    a, b = cluster(2, "--edit_rate=0", "--rate_limit=0")

    async def main() -> None:
        cfg = {"bases": ["127.0.0.1:%d" % a, "127.0.0.1:%d" % b], "base": "127.0.0.1:%d" % a,
               "doc": "otjs", "edits": 40, "seed": 11, "timeoutMs": 50000}
        proc = await asyncio.create_subprocess_exec(
            "node", "ot_clients.js", json.dumps(cfg), cwd=str(node_packages),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        node = NodeRun(proc)
        try:
            tie = await node.event("tie", timeout=30)
            assert tie["texts"] == [tie["server"]] * 3, tie
            by_arrival = [s for _, s in sorted(zip(tie["ackRevs"], tie["inserted"]))]
            assert tie["server"] == "😀" + "".join(reversed(by_arrival)) + " ties go here: "
            assert (await node.event("edited", timeout=40))["edits"] == 120
            assert proc.stdin is not None
            proc.stdin.write(b"done\n")
            await proc.stdin.drain()
            proc.stdin.close()
            final = await node.event("final", timeout=30)
            served = [(await asyncio.to_thread(http, p, "/api/docs/otjs"))[1] for p in (a, b)]
            assert served[0]["text"] == served[1]["text"] == final["server"]["text"]
            for client in final["clients"]:
                assert client["errors"] == [], client
                assert client["text"] == served[0]["text"] and client["revision"] == served[0]["rev"]
            assert await asyncio.wait_for(proc.wait(), 10) == 0, await node.stderr()
        finally:
            node.kill()
            await proc.wait()  # its pipes are closed inside this loop, not after it

    run(main())
