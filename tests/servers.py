"""Real server processes for tests that kill and restart them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, data_dir: str, *args: str, timeout: float = 15.0) -> subprocess.Popen:
    """``python server.py`` on 127.0.0.1:port with ``args``; returns once /healthz answers."""
    proc = subprocess.Popen(
        [sys.executable, "server.py", "--port=%d" % port, "--address=127.0.0.1", "--data_dir=%s" % data_dir,
         "--logging=warning", *args],
        cwd=ROOT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=1) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None:
                raise RuntimeError("server exited with %s" % proc.returncode)
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")
