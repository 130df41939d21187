"""The gate every HTTP request passes, once its head has arrived and before
any handler runs or any body byte is read.

:class:`RequestGate` wraps the delegate Tornado's Application builds for a
request (``Application.get_handler_delegate``, see ``server.py``) and refuses,
with a JSON body and ``Connection: close``:

* a request head larger than ``--max_header_size``: 431;
* a ``Host`` that is malformed or not one of ``--allowed_hosts``: 400
  (``bad_host``).  This defeats DNS rebinding: a page on ``evil.example``
  whose name now resolves to this server still sends ``Host: evil.example``;
* a body larger than its route takes (``Content-Length``, or any chunked
  body on a route that takes none): 413 (``too_large``).  Each handler class
  says what its methods take in ``body_limits``; routes that say nothing take
  no body.  Chunked bodies are bounded by the same limit while they are read.

A refused request's body is never read into memory: the gate takes the
connection from Tornado, writes the answer, and discards whatever the client
still sends for at most :data:`LINGER_SECONDS` before closing, so that the
client reads the answer instead of a connection reset.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
import urllib.parse
from typing import Any, Awaitable, Iterable

import tornado.httputil
from tornado.iostream import IOStream, StreamClosedError

from realtime.config import Config
from realtime.redact import redact_uri

log = logging.getLogger("tornado.access")

LINGER_SECONDS = 1.0
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
_REASONS = {400: "Bad Request", 413: "Payload Too Large", 431: "Request Header Fields Too Large"}


def split_host(value: str) -> str | None:
    """The host name (lower case, no port, no trailing dot; IPv6 without
    brackets) of a ``Host`` header value, or ``None`` if it is malformed."""
    if not value or len(value) > 300:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
    else:
        name, sep, port = value.partition(":")
        rest = sep + port
        if not _HOSTNAME.fullmatch(name):
            return None
    if rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:])):
        return None
    return name.lower().rstrip(".")


class HostPolicy:
    """Which ``Host`` names this server answers to.

    ``allowed`` entries are exact names, ``.example.com`` for a domain and its
    subdomains, or ``*`` for any name.  ``defaults`` (this machine's names and
    addresses) are allowed as well unless ``allowed`` holds ``*``."""

    def __init__(self, allowed: Iterable[str], defaults: Iterable[str] = ()) -> None:
        names = {a.strip().lower().rstrip(".") for a in allowed if a.strip()}
        self.any = "*" in names
        names.discard("*")
        names |= {d.lower().rstrip(".") for d in defaults if d}
        self.exact = {n.strip("[]") for n in names if not n.startswith(".")}
        self.suffixes = tuple(n for n in names if n.startswith("."))

    def allows(self, name: str) -> bool:
        if self.any or name in self.exact:
            return True
        return any(name.endswith(s) or name == s[1:] for s in self.suffixes)


def local_host_names(address: str, origins: Iterable[str]) -> list[str]:
    """The default ``--allowed_hosts``: localhost, the bound address (every
    interface address when bound to all), this machine's host name, and the
    hosts of ``--allowed_origins``."""
    names = ["localhost", "127.0.0.1", "::1"]
    if address:
        names.append(address)
    else:
        try:
            import psutil

            for addrs in psutil.net_if_addrs().values():
                names.extend(a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
        except Exception:  # psutil missing or the interfaces unreadable: the rest still applies
            pass
    try:
        names.append(socket.gethostname())
    except OSError:
        pass
    for origin in origins:
        host = urllib.parse.urlsplit(origin).hostname
        if host and origin != "*":
            names.append(host)
    return names


def body_limit(handler_class: type, method: str, cfg: Config) -> int:
    """Bytes of body ``handler_class`` takes for ``method``: its
    ``body_limits[method]``, an int or the name of an option; 0 otherwise."""
    spec = (getattr(handler_class, "body_limits", None) or {}).get(method, 0)
    return int(getattr(cfg, spec) if isinstance(spec, str) else spec)


def head_size(start_line: tornado.httputil.RequestStartLine, headers: tornado.httputil.HTTPHeaders) -> int:
    """Bytes of a request head as sent (request line and header lines)."""
    n = len(start_line.method) + len(start_line.path) + len(start_line.version) + 4
    for name, value in headers.get_all():
        n += len(name) + len(value) + 4
    return n


class RequestGate(tornado.httputil.HTTPMessageDelegate):
    """Checks a request's head, then passes everything on to ``inner``; or
    answers itself and ``inner`` never hears of the request."""

    def __init__(self, inner: tornado.httputil.HTTPMessageDelegate, request: tornado.httputil.HTTPServerRequest,
                 handler_class: type, cfg: Config, hosts: HostPolicy, on_refuse: Any = None) -> None:
        self.inner = inner
        self.request = request
        self.handler_class = handler_class
        self.cfg = cfg
        self.hosts = hosts
        self.on_refuse = on_refuse
        self.refused = False

    def headers_received(self, start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
                         headers: tornado.httputil.HTTPHeaders) -> Awaitable[None] | None:
        assert isinstance(start_line, tornado.httputil.RequestStartLine)
        refusal = self.check(start_line, headers)
        if refusal is not None:
            self.refused = True
            self.refuse(*refusal)
            return None
        return self.inner.headers_received(start_line, headers)

    def check(self, start_line: tornado.httputil.RequestStartLine,
              headers: tornado.httputil.HTTPHeaders) -> tuple[int, str, str] | None:
        cfg = self.cfg
        if head_size(start_line, headers) > cfg.max_header_size:
            return 431, "too_large", "request line and headers are larger than %d bytes" % cfg.max_header_size
        name = split_host(headers.get("Host") or self.request.host)
        if name is None:
            return 400, "bad_host", "malformed Host header"
        if not self.hosts.allows(name):
            return 400, "bad_host", "this server does not answer to host %r (see --allowed_hosts)" % name[:100]
        limit = body_limit(self.handler_class, start_line.method, cfg)
        length = headers.get("Content-Length")
        if length is not None:
            try:
                declared = int(length.split(",")[0].strip())
            except ValueError:
                return 400, "bad_message", "Content-Length must be an integer"
            if declared > limit:
                if limit == 0:
                    return 413, "too_large", "%s %s takes no request body" % (start_line.method, self.request.path)
                return 413, "too_large", "request body is larger than %d bytes" % limit
        elif "chunked" in headers.get("Transfer-Encoding", "").lower() and limit == 0:
            return 413, "too_large", "%s %s takes no request body" % (start_line.method, self.request.path)
        conn = self.request.connection
        if conn is not None and hasattr(conn, "set_max_body_size"):
            conn.set_max_body_size(limit)  # bounds a chunked body as it arrives
        return None

    def refuse(self, status: int, code: str, message: str) -> None:
        req = self.request
        log.warning("%d %s %s (%s) refused: %s", status, req.method, redact_uri(req.uri or ""), req.remote_ip,
                    message)
        if self.on_refuse is not None:
            self.on_refuse(status)
        body = json.dumps({"error": code, "message": message, "status": status}).encode()
        head = ("HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n"
                "Connection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n"
                % (status, _REASONS.get(status, "Error"), len(body))).encode("latin1")
        conn = req.connection
        detach = getattr(conn, "detach", None)
        if detach is None:  # not HTTP/1 (a test double): nothing to linger on
            return
        stream = detach()
        asyncio.ensure_future(_answer_and_close(stream, head + (b"" if req.method == "HEAD" else body)))

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return None if self.refused else self.inner.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.inner.on_connection_close()


async def _answer_and_close(stream: IOStream, data: bytes) -> None:
    """Write ``data``, stop sending, and discard what the client still sends
    (its body) until it closes or :data:`LINGER_SECONDS` pass."""
    loop = asyncio.get_running_loop()
    try:
        await stream.write(data)
        try:
            stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = loop.time() + LINGER_SECONDS
        while loop.time() < deadline:
            await asyncio.wait_for(stream.read_bytes(65536, partial=True), deadline - loop.time())
    except (StreamClosedError, asyncio.TimeoutError, OSError):
        pass
    finally:
        stream.close()
