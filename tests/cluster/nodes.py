"""server.py nodes of one cluster, for tests that kill and restart them (behind nginx)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from tests.servers import ServerProcess, free_port

KEY = "cluster-test-ingest-key"
NODE_ARGS = ("--xheaders", "--simulated_sensors=", "--host_metrics=false", "--shutdown_grace=1",
             "--ingest_key=" + KEY, "--presence_ttl=3")


class Node:
    """One node (``tests.servers.ServerProcess``) of the cluster on ``redis_url``."""

    def __init__(self, tmp: Any, index: int, redis_url: str) -> None:
        self.server = ServerProcess(free_port(), tmp / ("node%d" % index), "--backplane=" + redis_url, *NODE_ARGS)
        self.port = self.server.port

    def start(self) -> "Node":
        self.server.start()
        return self

    def signal(self, sig: int) -> int:
        """Send ``sig``; its exit status once it is gone."""
        self.server.send_signal(sig)
        return self.server.wait(15)

    def stop(self) -> None:
        self.server.kill()

    def connections(self) -> int:
        """Its open WebSockets, asked directly (not through nginx)."""
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % self.port, timeout=5) as r:
            return int(json.loads(r.read())["connections"])


def busiest(nodes: list[Node]) -> Node:
    """The node with the most clients (asked directly, not through nginx); it has some."""
    counts = [node.connections() for node in nodes]
    best = max(range(len(nodes)), key=lambda i: counts[i])
    assert counts[best] > 0, counts
    return nodes[best]
