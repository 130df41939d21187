"""HTML pages.  Every page gets a strict CSP and a guest session cookie."""

from __future__ import annotations

from typing import Any

import tornado.web

from handlers.base import SESSION_COOKIE, request_token
from handlers.gate import split_host
from realtime.auth import AuthError
from realtime.context import Context


class Page(tornado.web.RequestHandler):
    template = ""
    title = ""

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx

    def set_default_headers(self) -> None:
        # The gate has refused a Host outside --allowed_hosts; the value is
        # still parsed again here, so nothing but a host[:port] reaches the CSP.
        host = self.request.host
        sockets = " ws://%s wss://%s" % (host, host) if split_host(host) is not None else ""
        self.set_header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'%s; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'; form-action 'self'" % sockets,
        )
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("X-Frame-Options", "DENY")

    def ensure_session(self) -> None:
        """Give the browser a signed guest session so its tabs share one identity."""
        if self.ctx.auth.mode != "open":
            return
        if self.ctx.auth.from_session(self.get_cookie(SESSION_COOKIE)) is None:
            ident = self.ctx.auth.new_guest()
            self.set_cookie(SESSION_COOKIE, self.ctx.auth.session_for(ident), httponly=True,
                            samesite="Lax", expires_days=30,
                            secure=self.request.protocol == "https")

    def require_token(self) -> bool:
        """In token mode, a page that shows stored data needs a valid token
        (``?token=``), as the socket it mirrors does; answers 401 otherwise."""
        if self.ctx.auth.mode != "token":
            return True
        token = request_token(self)
        try:
            if token is None:
                raise AuthError(401, "a token is required (?token=)")
            self.ctx.auth.verify_token(token)
        except AuthError as e:
            self.set_status(401)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish("401: %s\n" % e.message)
            return False
        return True

    def get(self, *args: str) -> None:
        self.ensure_session()
        self.render(self.template, title=self.title, **self.page_args(*args))

    def page_args(self, *args: str) -> dict[str, Any]:
        return {}


class IndexPage(Page):
    template = "index.html"
    title = "Realtime"


class ChatPage(Page):
    template = "chat.html"
    title = "Chat"


class NotFoundPage(Page):
    def prepare(self) -> None:
        self.set_status(404)
        if self.request.path.startswith(("/api/", "/ws/")):
            self.set_header("Content-Type", "application/json")
            self.finish({"error": "not_found", "message": "no such endpoint"})
            return
        self.render("404.html", title="Not found")


class StaticFiles(tornado.web.StaticFileHandler):
    """``/static/``: Tornado's file handler with ``nosniff``, and 404 (not a
    500 and a traceback) for a path no file can have."""

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        if "\x00" in absolute_path:
            raise tornado.web.HTTPError(404)
        return super().validate_absolute_path(root, absolute_path)
