"""Collaborative editing over HTTP and WebSocket: thin adapters over
:class:`realtime.editing.EditingService`.

* ``/ws/edit/<doc>``   the editing socket (docs/PROTOCOL.md, "Collaborative editing")
* ``/api/docs``        documents, most recently edited first
* ``/api/docs/<doc>``  one document's text and revision (404 if it never existed)
* ``/edit/``           the documents page (``?doc=<id>`` opens or creates one)
* ``/edit/<doc>``      the editing page (one document)

A bad document id in a socket URL is refused with HTTP 400 before the upgrade,
as are a malformed ``?rev=``, ``?client=`` or ``?units=``.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from handlers.base import BaseSocketHandler, JSONHandler
from handlers.pages import Page
from realtime.documents import valid_doc_id
from realtime.editing import DOC_ID_RULE, EditingService, Peer, valid_client_id
from realtime.protocol import ProtocolError, error_message, get_int
from realtime.units import CODEPOINT, UNITS

_REV = re.compile(r"[0-9]{1,18}")


class _EditingConn:
    """The editing socket's per-connection state, in one slotted object (the base keeps
    handler instances under CPython's shared-key limit; one attribute here)."""

    __slots__ = ("peer", "since", "want_client", "units")

    def __init__(self) -> None:
        self.peer: Peer | None = None
        self.since: int | None = None
        self.want_client: str | None = None
        self.units = CODEPOINT


class EditingSocketHandler(BaseSocketHandler):
    """``/ws/edit/<doc>?rev=<n>&client=<id>&units=utf16``: one connection editing one document."""

    app_name = "editing"

    def initialize(self, ctx: Any) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.ed = _EditingConn()

    @property
    def editing(self) -> EditingService:
        return self.ctx.editing  # type: ignore[no-any-return]

    @property
    def peer(self) -> Peer | None:
        return self.ed.peer

    def prepare(self) -> None:
        """The document id, ``?rev=``, ``?client=`` and ``?units=`` are checked
        before identity and the upgrade: a bad one is HTTP 400 with a JSON body."""
        doc_id = self.path_args[0] if self.path_args else ""
        if not valid_doc_id(doc_id):
            self.refuse(400, DOC_ID_RULE)
            return
        rev = self.get_query_argument("rev", "")
        if rev:
            if not _REV.fullmatch(rev):
                self.refuse(400, "rev must be a non-negative integer")
                return
            self.ed.since = int(rev)
        client = self.get_query_argument("client", "")
        if client:
            if not valid_client_id(client):
                self.refuse(400, "client must be a client id this server handed out ('c-' and 4-40 of A-Z a-z 0-9 _ -)")
                return
            self.ed.want_client = client
        units = self.get_query_argument("units", "")
        if units:
            if units not in UNITS:
                self.refuse(400, "units must be 'codepoint' (the default) or 'utf16'")
                return
            self.ed.units = units
        super().prepare()

    async def opened(self, *args: str) -> None:
        peer = await self.editing.attach(self, args[0], self.ed.want_client, self.ed.units,
                                         may_create=lambda: self.ctx.doc_creations.take(self.ip))
        self.ed.peer = peer
        if self._closing:  # gone while the document was loading
            self.editing.leave(peer)
            return
        await self.editing.welcome(peer, self.ed.since)

    def closed(self) -> None:
        if self.ed.peer is not None:
            self.editing.leave(self.ed.peer)

    def rights(self) -> dict[str, Any]:
        assert self.user is not None
        return {"readonly": not self.user.can("edit")}

    def _joined_peer(self) -> Peer:
        peer = self.ed.peer
        if peer is None or not peer.joined:
            raise ProtocolError("conflict", "wait for the snapshot before sending edits or cursors")
        return peer

    def msg_op(self, msg: dict[str, Any]) -> None:
        """Errors about an op carry its ``seq`` so the client knows which one failed."""
        seq = msg.get("seq")
        try:
            peer = self._joined_peer()
            rev = get_int(msg, "rev", minimum=0)
            seq = get_int(msg, "seq", minimum=0)
            if "op" not in msg:
                raise ProtocolError("bad_message", "'op' is required")
            self.editing.submit(peer, rev, msg["op"], seq)
        except ProtocolError as exc:
            self.ctx.stats.error(exc.code)
            err = error_message(exc.code, exc.message, msg.get("ref"))
            if type(seq) is int:
                err["seq"] = seq
            self.send(err)

    def msg_cursor(self, msg: dict[str, Any]) -> None:
        peer = self._joined_peer()
        rev = get_int(msg, "rev", minimum=0)
        anchor = get_int(msg, "anchor", minimum=0)
        head = get_int(msg, "head", required=False, default=anchor, minimum=0)
        assert rev is not None and anchor is not None and head is not None
        self.editing.cursor(peer, rev, anchor, head)


class DocsAPI(JSONHandler):
    """``GET /api/docs``"""

    async def get(self) -> None:
        self.finish({"docs": await self.ctx.editing.list_docs()})


class DocAPI(JSONHandler):
    """``GET /api/docs/<doc>``"""

    async def get(self, doc_id: str) -> None:
        if not valid_doc_id(doc_id):
            raise ProtocolError("bad_message", DOC_ID_RULE)
        self.finish(await self.ctx.editing.get_doc(doc_id))


def ago(ms: int, now: float | None = None) -> str:
    """'just now', '5 minutes ago', '3 days ago' for a timestamp in epoch milliseconds."""
    seconds = max(0.0, (now if now is not None else time.time()) - ms / 1000.0)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return "%d %s%s ago" % (n, unit, "" if n == 1 else "s")
    return "just now"


class DocsPage(Page):
    """``/edit/``: the documents, and a form that opens (or creates) one by name."""

    title = "Documents"

    async def get(self, *args: str) -> None:  # type: ignore[override]
        if not self.require_token():
            return
        self.ensure_session()
        wanted = (self.get_query_argument("doc", "") or "").strip()
        error = ""
        if wanted:
            if valid_doc_id(wanted):
                self.redirect("/edit/" + wanted)
                return
            error = DOC_ID_RULE[0].upper() + DOC_ID_RULE[1:] + "."
            self.set_status(400)
        docs = await self.ctx.editing.list_docs(500)
        self.render("docs.html", title=self.title, docs=docs, error=error, wanted=wanted, ago=ago,
                    suggestion="doc-" + secrets.token_hex(3))


class EditingPage(Page):
    """``/edit/<doc>``: the shared editor (static/js/editing.js)."""

    def get(self, *args: str) -> None:
        doc_id = args[0]
        if not valid_doc_id(doc_id):
            self.set_status(404)
            self.render("404.html", title="Not found")
            return
        self.ensure_session()
        self.render("editing.html", title=doc_id, doc_id=doc_id)


def register(ctx: Any) -> list[Any]:
    """Build the editing service into ``ctx.services["editing"]``; return the routes."""
    cfg = ctx.cfg
    svc = EditingService(
        ctx.storage.document_log(), ctx.hub,
        max_doc_size=cfg.max_doc_size,
        max_op_size=cfg.max_op_size,
        edit_rate=cfg.edit_rate,
        edit_burst=cfg.edit_burst,
        log_keep=cfg.doc_log_keep,
        snapshot_every=cfg.snapshot_every,
        max_docs=cfg.max_docs,
        max_peers=cfg.max_peers_per_doc,
        idle_seconds=cfg.doc_idle_seconds,
        cursor_interval=cfg.cursor_interval,
        commit_delay=cfg.doc_commit_delay,
        max_message_bytes=cfg.max_message_size,
        message_rate=cfg.rate_limit,
        message_burst=cfg.rate_burst,
        lease=getattr(ctx.storage, "lease", None),
        leader_ttl=cfg.doc_leader_ttl,
    )
    ctx.services["editing"] = svc
    kw = {"ctx": ctx}
    return [
        (r"/ws/edit/([^/]+)", EditingSocketHandler, kw),
        (r"/api/docs", DocsAPI, kw),
        (r"/api/docs/([^/]+)", DocAPI, kw),
        (r"/edit/?", DocsPage, kw),
        (r"/edit/([^/]+)", EditingPage, kw),
    ]
