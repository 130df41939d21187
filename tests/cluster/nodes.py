"""server.py nodes of one cluster, for tests that kill and restart them (behind nginx)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from typing import Any

from tests.servers import free_port, start_server

KEY = "cluster-test-ingest-key"
NODE_ARGS = ("--xheaders", "--simulated_sensors=", "--host_metrics=false", "--shutdown_grace=1",
             "--ingest_key=" + KEY, "--presence_ttl=3")


class Node:
    def __init__(self, tmp: Any, index: int, redis_url: str) -> None:
        self.port = free_port()
        self.data_dir = str(tmp / ("node%d" % index))
        self.redis_url = redis_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Node":
        self.proc = start_server(self.port, self.data_dir, "--backplane=" + self.redis_url, *NODE_ARGS)
        return self

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(15)
        self.proc = None
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

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
