"""Real server processes for tests that kill and restart them."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, data_dir: str, *args: str) -> list[str]:
    """``python server.py`` on 127.0.0.1:port with ``args`` (logging at warning unless they say)."""
    logging = [] if any(a.startswith("--logging=") for a in args) else ["--logging=warning"]
    return [sys.executable, "server.py", "--port=%d" % port, "--address=127.0.0.1", "--data_dir=%s" % data_dir,
            *logging, *args]


def start_server(port: int, data_dir: str, *args: str, timeout: float = 15.0, wrap: tuple[str, ...] = (),
                 stderr: Any = None) -> subprocess.Popen:
    """``python server.py`` on 127.0.0.1:port with ``args`` (under the ``wrap``
    command, e.g. prlimit); returns once /healthz answers (over https:// when
    ``args`` name a --certfile)."""
    proc = subprocess.Popen([*wrap, *server_command(port, data_dir, *args)], cwd=ROOT, stderr=stderr)
    scheme = "https" if any(a.startswith("--certfile=") for a in args) else "http"
    context = ssl._create_unverified_context() if scheme == "https" else None  # only to see that it is up
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen("%s://127.0.0.1:%d/healthz" % (scheme, port), timeout=1,
                                        context=context) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None:
                raise RuntimeError("server exited with %s" % proc.returncode)
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def http_json(port: int, path: str, data: bytes | None = None, headers: dict[str, str] | None = None,
              ) -> tuple[int, Any]:
    """``(status, decoded JSON body)`` of a request to 127.0.0.1:port, errors included."""
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
