"""Debian's nginx in front of server.py nodes, for tests: conf/nginx.conf.example itself.

The example is an http-context file (what goes in /etc/nginx/conf.d/).  This helper wraps
it in a minimal nginx.conf of its own -- its own prefix directory, pid file, error log and
temp paths, ``daemon off`` -- and changes only what a test must: the upstream addresses,
the ``listen`` port (a free one on 127.0.0.1), a throwaway certificate and the access log
path.  Each change must match the example exactly once, so a test fails (instead of
testing something else) when the example changes shape.  The process is stopped by its
pid, never as a system service.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.servers import ROOT, free_port

EXAMPLE = os.path.join(ROOT, "conf", "nginx.conf.example")
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def require_nginx() -> str:
    """The nginx binary; missing fails in CI (scripts/test.sh installs it) and skips elsewhere."""
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (scripts/test.sh installs Debian's nginx)")
        pytest.skip("nginx is not installed")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed for the test certificate")
    return path


def _once(pattern: str, repl: str, text: str, flags: int = 0) -> str:
    out, n = re.subn(pattern, repl, text, flags=flags)
    assert n == 1, "conf/nginx.conf.example changed shape: %r matched %d times" % (pattern, n)
    return out


def site_config(example: str, *, port: int, upstreams: list[int], cert: str, key: str, logs: str) -> str:
    """The example with this test's upstreams, port, certificate and access log."""
    servers = "".join("    server 127.0.0.1:%d max_fails=1 fail_timeout=5s;\n" % p for p in upstreams)
    text = _once(r"(upstream realtime \{\n(?:\s*#[^\n]*\n)*)(?:\s*server [^\n]*\n)+", r"\g<1>" + servers, example)
    text = _once(r"listen 443 ssl;", "listen 127.0.0.1:%d ssl;" % port, text)
    text = _once(r"ssl_certificate\s+/etc/ssl/[^;]+;", "ssl_certificate %s;" % cert, text)
    text = _once(r"ssl_certificate_key\s+/etc/ssl/[^;]+;", "ssl_certificate_key %s;" % key, text)
    return _once(r"access_log /var/log/nginx/realtime\.log", "access_log %s/realtime.log" % logs, text)


class Nginx:
    """``Nginx(prefix, upstreams).start()``: https://127.0.0.1:<port>/ in front of the nodes."""

    def __init__(self, prefix: str, upstreams: list[int], port: int | None = None) -> None:
        self.prefix = prefix
        self.upstreams = upstreams
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs = os.path.join(prefix, "logs")
        self.conf = os.path.join(prefix, "nginx.conf")

    @property
    def url(self) -> str:
        return "https://127.0.0.1:%d" % self.port

    @property
    def ws_url(self) -> str:
        return "wss://127.0.0.1:%d" % self.port

    @staticmethod
    def client_ssl() -> ssl.SSLContext:
        """TLS for clients of the test's self-signed certificate."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def write_config(self) -> None:
        for sub in ("logs", "conf.d", "tmp"):
            os.makedirs(os.path.join(self.prefix, sub), exist_ok=True)
        cert, key = os.path.join(self.prefix, "cert.pem"), os.path.join(self.prefix, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1"],
                       check=True, capture_output=True, timeout=30)
        with open(EXAMPLE) as f:
            site = site_config(f.read(), port=self.port, upstreams=self.upstreams, cert=cert, key=key,
                               logs=self.logs)
        with open(os.path.join(self.prefix, "conf.d", "realtime.conf"), "w") as f:
            f.write(site)
        temp = "".join("    %s_temp_path %s;\n" % (name, os.path.join(self.prefix, "tmp", name))
                       for name in TEMP_PATHS)
        # As root, nginx's workers would switch to 'nobody', who may not enter the test's
        # directories: they stay this user, as for an unprivileged nginx.
        user = "user root;\n" if os.geteuid() == 0 else ""
        main = ("%sdaemon off;\nworker_processes 1;\npid %s;\nerror_log %s warn;\n"
                "events { worker_connections 1024; }\n"
                "http {\n    access_log %s;\n%s    include %s;\n}\n") % (
            user, os.path.join(self.prefix, "nginx.pid"), os.path.join(self.logs, "error.log"),
            os.path.join(self.logs, "access.log"), temp, os.path.join(self.prefix, "conf.d", "*.conf"))
        with open(self.conf, "w") as f:
            f.write(main)

    def _argv(self, *extra: str) -> list[str]:
        return [require_nginx(), "-p", self.prefix, "-c", self.conf, "-e", os.path.join(self.logs, "error.log"),
                *extra]

    def start(self, timeout: float = 10.0) -> "Nginx":
        self.write_config()
        check = subprocess.run(self._argv("-t"), capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, "nginx -t refused the configuration:\n" + check.stderr + self.error_log()
        self.proc = subprocess.Popen(self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited with %s:\n%s" % (self.proc.returncode, self.error_log()))
            try:
                status, _ = self.get("/healthz")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not proxy /healthz within %.0f s:\n%s" % (timeout, self.error_log()))

    def get(self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 5.0) -> tuple[int, Any]:
        """An HTTP request through nginx: (status, decoded JSON body or text)."""
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.client_ssl()) as r:
                body = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            body, status = e.read(), e.code
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode("utf-8", "replace")

    def error_log(self) -> str:
        try:
            with open(os.path.join(self.logs, "error.log")) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: open WebSockets would hold a graceful one for
        an hour) to the master by its pid; SIGKILL to it and its workers if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        import psutil

        workers = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            for worker in workers:
                try:
                    worker.kill()
                except psutil.Error:
                    pass
            proc.kill()
            proc.wait(5)
