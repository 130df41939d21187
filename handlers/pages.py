"""HTML pages.  Every page gets a strict CSP and a guest session cookie."""

from __future__ import annotations

from typing import Any

import tornado.web

from handlers.base import SESSION_COOKIE
from realtime.context import Context


class Page(tornado.web.RequestHandler):
    template = ""
    title = ""

    def initialize(self, ctx: Context) -> None:
        self.ctx = ctx

    def set_default_headers(self) -> None:
        host = self.request.host
        self.set_header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self' ws://%s wss://%s; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'; form-action 'self'" % (host, host),
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
