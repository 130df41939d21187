"""Collaborative editing: live documents, a durable op log, peers and cursors.

:class:`EditingService` keeps each open document as a :class:`LiveDoc` around a
:class:`~realtime.documents.DocumentState` (the pure OT authority) and speaks to
connections through a small :class:`Member` protocol, so it imports nothing from
``tornado.web`` and tests can drive it with fakes.

Contracts
---------
* **Order, then durability.**  An incoming op is transformed and given its
  revision synchronously, in memory, the moment it arrives
  (:meth:`DocumentState.submit`), so the order is the arrival order and needs
  no lock.  Its log row is then written through the store's group commit
  (one write per document with the store at a time, at least
  ``commit_delay`` apart: the ops that arrive meanwhile share the next one).  The sender's ``ack`` and the
  ``op`` broadcast to everyone else go out **only after that transaction has
  committed**, in revision order.  A ``kill -9`` after an ack loses nothing.
* **Clients only ever see committed revisions.**  A joining client's
  snapshot (or catch-up) is taken in memory, then sent once its revision has
  committed; live ops broadcast meanwhile are held and released after it,
  minus those it already covers.  Cursors are relayed at the last committed
  revision.  So every revision a client knows is in the store.
* **A failed commit never lets copies diverge.**  Each write checks that the
  document's stored revision is the one it follows, so once a write fails,
  every later write of that document fails too (the store keeps a gap-free
  prefix).  On the first failure the document is dropped from memory and its
  peers are closed with 1011; they reconnect with ``?rev=`` (never newer than
  the store, by the rule above), the document is reloaded from the store, and
  each client resends its unacknowledged op -- same client id and seq, so it
  is applied at most once.
* **Dedupe.**  A resent op (same client id and seq) is acknowledged again with
  its original revision (after that revision has committed) and not applied
  twice; the dedupe table is in every snapshot and rebuilt from the log, so it
  survives restarts.  A client keeps its client id across reconnects with
  ``?client=``; an id is only handed to a connection of the user who had it.
* **Units.**  Each connection counts positions in code points (the core's
  unit) or UTF-16 code units (``?units=utf16``, :mod:`realtime.units`); its
  ops, cursors and catch-up are converted at this edge, against the text they
  refer to.  A document's peers of each unit share one topic, so a broadcast
  is encoded once per unit in use, never once per peer.
* **Several nodes** (cluster mode) keep one order per document: the node
  holding the document's lease leads it (applies, appends, broadcasts); the
  others forward their peers' ops to it and ack each when its broadcast comes
  back.  Appends are compare-and-append, so two nodes that both lead for a
  moment still leave one log: the loser rebases (see "a leader per document").
* **Snapshots** (``format`` 1, :meth:`DocumentState.to_snapshot` without the
  log) are written every ``snapshot_every`` ops and when an idle document is
  unloaded; the op log in the store keeps ``log_keep`` ops before the latest
  revision (for catch-up) and at least every op after the latest snapshot (for
  replay).  Loading = latest snapshot + the ops after it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from functools import partial
from typing import Any, Callable, Iterator, NamedTuple, Protocol

import ujson

from realtime import ot
from realtime.auth import Identity
from realtime.documents import (
    SNAPSHOT_FORMAT,
    DocumentState,
    LogEntry,
    SnapshotError,
    valid_doc_id,
)
from realtime.hub import Hub
from realtime.limits import TokenBucket
from realtime.protocol import Close, Outgoing, ProtocolError
from realtime.storage.base import (
    DocumentLog,
    Lease,
    Loaded,
    LogGap,
    StorageError,
    StoreBusy,
    StoredOp,
    TooManyDocuments,
)
from realtime.units import CODEPOINT, UNITS, UTF16, TextUnits, utf16_length

log = logging.getLogger("realtime.editing")

COLORS = 8  # peers get colour indexes 0..7 (the page maps them to its palette)
OWNERS_MAX = 10_000  # client id -> user id, per document, for ?client= reuse
_CLIENT_ID = re.compile(r"c-[A-Za-z0-9_-]{4,40}")
DOC_ID_RULE = "document ids are 1-64 characters: ASCII letters, digits, '_' or '-'"


def valid_client_id(s: object) -> bool:
    """A client id: ``c-`` then 4-40 of ``A-Z a-z 0-9 _ -`` (what the server hands out)."""
    return type(s) is str and _CLIENT_ID.fullmatch(s) is not None


def new_client_id() -> str:
    return "c-" + secrets.token_urlsafe(8)


def now_ms() -> int:
    return int(time.time() * 1000)


def move_positions(
    state: DocumentState, rev: int, positions: tuple[int, ...], upto: int, units: str = CODEPOINT
) -> tuple[int, ...] | None:
    """Move ``positions`` in the text at ``rev`` to the text at ``upto``, counted in ``units``.

    ``None`` when the log no longer reaches back to ``rev`` (in those units).
    Raises ``ProtocolError("bad_message")`` for a position outside the text at
    ``rev``.  Text inserted exactly at a position goes after it.
    """
    entries = state.ops_since(rev, units)
    if entries is None:
        return None
    utf16 = units == UTF16
    if entries:
        length = ot.lengths(entries[0].op)[0]
    else:
        length = state.length16 if utf16 else len(state.text)
    for p in positions:
        if type(p) is not int or not 0 <= p <= length:
            what = "UTF-16 code units" if utf16 else "characters"
            raise ProtocolError(
                "bad_message", f"cursor position {p!r} is outside the text at rev {rev} ({length} {what})"
            )
    size = utf16_length if utf16 else len
    for entry in entries:
        if entry.rev > upto:
            break
        positions = tuple(ot.transform_index(p, entry.op, size=size) for p in positions)
    return positions


def pick_color(used: Iterator[int]) -> int:
    """The least used colour index (lowest first on a tie)."""
    counts = [0] * COLORS
    for c in used:
        counts[c % COLORS] += 1
    return counts.index(min(counts))


def build_state(doc_id: str, loaded: Loaded, **limits: int) -> tuple[DocumentState, int, dict[str, str]]:
    """The state a :class:`Loaded` describes: snapshot + the ops after it.

    Returns ``(state, snapshot_rev, owners)`` where ``owners`` maps the client
    ids seen in the loaded log to their user ids.  Raises
    :class:`~realtime.documents.SnapshotError` when the stored data is
    inconsistent (unknown format, a gap, an op that does not fit).
    """
    ops = [(rev, ujson.loads(op), client, seq, user) for rev, op, client, seq, user in loaded.ops]
    snap_rev = 0
    if loaded.snapshot is not None:
        snap_rev, fmt, raw = loaded.snapshot
        if fmt != SNAPSHOT_FORMAT:
            raise SnapshotError(f"document {doc_id}: unsupported snapshot format {fmt!r}")
        data = ujson.loads(raw)
        if not isinstance(data, dict) or data.get("rev") != snap_rev:
            raise SnapshotError(f"document {doc_id}: snapshot row does not match its revision")
        data["log"] = [[rev, op, client, seq] for rev, op, client, seq, _ in ops if rev <= snap_rev]
        state = DocumentState.from_snapshot(data, **limits)
    else:
        state = DocumentState(doc_id, "", 0, **limits)
    try:
        for rev, op, client, seq, _ in ops:
            if rev > state.rev:
                state.apply_entry(rev, op, client, seq)
    except ProtocolError as exc:
        raise SnapshotError(f"document {doc_id}: stored log does not replay: {exc.message}") from None
    if state.rev != loaded.rev:
        raise SnapshotError(f"document {doc_id}: stored log ends at rev {state.rev}, the document is at {loaded.rev}")
    owners = {client: user for _, _, client, _, user in ops if client and user}
    return state, snap_rev, owners


# -- live documents -----------------------------------------------------------------


class Member(Protocol):
    """A connection as the editing core sees it (handlers.editor's socket)."""

    user: Identity

    def deliver(self, out: Outgoing) -> None: ...

    def send(self, obj: dict[str, Any]) -> None: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Peer:
    """One connection in one document: its client id, colour, limits, cursor.

    It is the hub subscriber for the document's topic.  Until :meth:`release`
    it holds what arrives (the snapshot is on its way); after that it drops
    its own messages (its op comes back as an ``ack``) and ops its snapshot
    already covered.
    """

    __slots__ = (
        "member", "doc", "client_id", "user", "user_json", "color", "bucket",
        "joined", "gone", "after_rev", "buffer", "cursor", "cursor_sent", "cursor_timer", "units",
    )

    def __init__(self, member: Member, doc: LiveDoc, client_id: str, color: int, bucket: TokenBucket,
                 units: str = CODEPOINT) -> None:
        self.member = member
        self.units = units  # what this connection's positions count (realtime.units)
        self.doc = doc
        self.client_id = client_id
        self.user = member.user
        self.user_json = member.user.to_json()
        self.color = color
        self.bucket = bucket
        self.joined = False  # announced to the others
        self.gone = False
        self.after_rev = -1
        self.buffer: list[Outgoing] | None = []
        self.cursor: tuple[int, int, int] | None = None  # (committed rev, anchor, head)
        self.cursor_sent = -1e18
        self.cursor_timer: asyncio.TimerHandle | None = None

    def deliver(self, out: Outgoing) -> None:
        """What the hub brings: peers, cursors.  Never an op: another node's
        ops reach peers only once this node has applied them, in rev order
        (:meth:`deliver_op`)."""
        if out.kind not in _NOT_FOR_PEERS:
            self._take(out)

    def deliver_op(self, out: Outgoing) -> None:
        self._take(out)

    def _take(self, out: Outgoing) -> None:
        if self.buffer is not None:
            self.buffer.append(out)
            return
        # Only what a backplane envelope carries: kind, rev (as seq), client.
        if out.client == self.client_id:
            return
        kind = out.kind
        if kind == "op":
            if out.seq is not None and out.seq <= self.after_rev:
                return
        elif kind == "cursor" and out.seq is not None and out.seq < self.after_rev:
            return
        self.member.deliver(out)



    @property
    def can_edit(self) -> bool:
        """The member's roles now: a ``refresh`` may bring a token with or without ``edit``."""
        return self.member.user.can("edit")

    def release(self) -> None:
        held, self.buffer = self.buffer or [], None
        for out in held:
            self._take(out)

    def info(self) -> dict[str, Any]:
        return {"client": self.client_id, "user": self.user_json, "color": self.color}

    def __repr__(self) -> str:
        return f"Peer({self.client_id!r}, doc={self.doc.id!r}, user={self.user.id!r})"


class Pending(NamedTuple):
    """An op applied in memory, not yet acknowledged."""

    rev: int
    op: list[Any]
    peer: Peer | None
    client: str | None
    seq: int | None
    user_id: str | None
    length: int  # of the text after it
    op16: list[Any]  # op counted in UTF-16 units, for the peers using them
    # As the client sent it, for a rebase (cluster mode): the op is transformed
    # again from its own base over the log in its final order, exactly as the
    # client transforms it, since the two transform paths need not agree.
    base_rev: int = 0
    sent: Any = None
    units: str = CODEPOINT


class LiveDoc:
    """An open document: its state, commit pipeline, peers and waiters."""

    def __init__(self, state: DocumentState, snapshot_rev: int, owners: dict[str, str], updated: int) -> None:
        self.state = state
        self.id = state.doc_id
        self.topic = "doc:" + state.doc_id  # peers counting code points
        self.topic16 = self.topic + "@utf16"  # peers counting UTF-16 code units
        self.committed_rev = state.rev
        self.delivered_rev = state.rev  # the last op handed to this node's peers
        self.committed_text = state.text
        self._committed_units: TextUnits | None = None
        self.snapshot_rev = snapshot_rev
        self.updated = updated
        self.peers: dict[str, Peer] = {}
        self.owners: OrderedDict[str, str] = OrderedDict(owners)
        self.batch: list[Pending] = []  # applied, not yet handed to the store
        self.snapshots: list[tuple[int, str]] = []  # due with the batch
        self.inflight: deque[Pending] = deque()  # handed to the store, not yet committed
        self.waiters: dict[int, list[Callable[[BaseException | None], None]]] = {}
        self.broken = False
        self.rebasing = False  # re-reading the log after another node appended to it (cluster mode)
        self.conflict = False  # another node appended: rebase once the write in flight is back
        self.rebases = 0
        self.remote_peers: dict[str, tuple[dict[str, Any], float]] = {}  # other nodes' peers, last heard
        self.deferred: list[Callable[[], None]] = []  # ops that arrived during a rebase, applied after it
        # Cluster mode with a leader per document: the node holding the lease
        # applies and appends every op; the others forward theirs to it.
        self.lease: Lease | None = None
        self.leader = True  # this node orders the document's ops (always, on one node)
        self.forwarded: dict[str, deque[Forwarded]] = {}  # client id -> sent to the leader, not yet answered
        self.resend_handle: asyncio.TimerHandle | None = None
        self.writing = False  # a write of this document is with the store
        self.last_write = -1e18  # loop time the last write was handed over
        self.flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self.evict_handle: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        return bool(self.peers or self.batch or self.inflight or self.waiters or self.forwarded)

    @property
    def idle_writer(self) -> bool:
        """Nothing of this node's own on its way to the log."""
        return not (self.batch or self.inflight or self.writing or self.rebasing or self.deferred)

    def announced(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.joined]

    def committed_units(self) -> TextUnits:
        """Position conversions for the text at ``committed_rev``."""
        if self.committed_text is self.state.text:
            return self.state.text_units()
        units = self._committed_units
        if units is None or units.text is not self.committed_text:
            units = self._committed_units = TextUnits(self.committed_text)
        return units

    def when_committed(self, rev: int, fn: Callable[[BaseException | None], None]) -> None:
        """Call ``fn(None)`` once ``rev`` has committed (now, if it has), ``fn(exc)`` if it never will."""
        if rev <= self.committed_rev:
            fn(None)
        else:
            self.waiters.setdefault(rev, []).append(fn)

    async def until_committed(self, rev: int) -> None:
        if rev <= self.committed_rev:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(exc: BaseException | None) -> None:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)

        self.when_committed(rev, done)
        await fut

    def run_waiters(self, upto: int, exc: BaseException | None = None) -> None:
        if not self.waiters:
            return
        due = [r for r in self.waiters if exc is not None or r <= upto]
        for rev in sorted(due):
            for fn in self.waiters.pop(rev):
                try:
                    fn(exc)
                except Exception:
                    log.exception("document %s: commit waiter failed", self.id)

    def remember_owner(self, client_id: str, user_id: str) -> None:
        self.owners[client_id] = user_id
        self.owners.move_to_end(client_id)
        while len(self.owners) > OWNERS_MAX:
            self.owners.popitem(last=False)


class Forwarded(NamedTuple):
    """An op of one of this node's peers, sent to the document's leader on another node."""

    peer: Peer
    base_rev: Any
    op: Any
    seq: Any
    sent_at: float


class Unavailable(Exception):
    """The document failed to save: its peers reconnect and it is reloaded."""


# Between nodes only (cluster mode): ops reach peers through the document, and
# the peer list is kept up to date with these two, which clients never see.
PEER_QUERY, PEER_ANNOUNCE = "peer_query", "peer_announce"
# With a leader per document: a follower's op for the leader, the leader's
# answer to one (an error, or the ack of a resend), and a leader letting go.
SUBMIT, REPLY, LEADER_GONE = "submit", "reply", "leader_gone"
_NOT_FOR_PEERS = frozenset({"op", PEER_QUERY, PEER_ANNOUNCE, SUBMIT, REPLY, LEADER_GONE})
FORWARD_RESEND = 1.0  # seconds: an op the leader has not answered is sent again (same seq)


class DocFeed:
    """A document's subscription to its topic on this node, for the ops other
    nodes committed (cluster mode): they go through the service, which applies
    them to this node's copy and hands them to its peers in rev order."""

    __slots__ = ("service", "doc_id")

    def __init__(self, service: "EditingService", doc_id: str) -> None:
        self.service = service
        self.doc_id = doc_id

    def deliver(self, out: Outgoing) -> None:
        doc = self.service.docs.get(self.doc_id)
        if doc is None:
            return
        kind = out.kind
        if kind == "op" and out.seq is not None:
            self.service._remote_op(doc, out)
        elif kind in ("peer_joined", PEER_ANNOUNCE, "peer_left", PEER_QUERY):
            self.service._remote_peer(doc, kind, out)
        elif kind == SUBMIT:
            self.service._forwarded_op(doc, out.obj)
        elif kind == REPLY:
            self.service._leader_reply(doc, out.obj)
        elif kind == LEADER_GONE:
            self.service._leader_gone(doc)


class EditingService:
    """Documents, their durable op logs, peers and cursors, over a store and a hub."""

    def __init__(
        self,
        log: DocumentLog,
        hub: Hub,
        *,
        max_doc_size: int = 200_000,
        max_op_size: int = 10_000,
        edit_rate: float = 15.0,
        edit_burst: float = 30.0,
        log_keep: int = 1000,
        snapshot_every: int = 200,
        max_docs: int = 10_000,
        max_peers: int = 100,
        idle_seconds: float = 30.0,
        cursor_interval: float = 0.05,
        commit_delay: float = 0.0,
        max_message_bytes: int = 64 * 1024,
        message_rate: float = 0.0,
        message_burst: float = 0.0,
        lease: Callable[[str, float], Lease] | None = None,
        leader_ttl: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if log_keep < 1 or snapshot_every < 1:
            raise ValueError("doc_log_keep and snapshot_every must be at least 1")
        self.log = log
        self.hub = hub
        self.max_doc_size = max_doc_size
        self.max_op_size = max_op_size
        self.edit_rate = edit_rate
        self.edit_burst = edit_burst
        self.log_keep = log_keep
        self.snapshot_every = snapshot_every
        self.max_docs = max_docs
        self.max_peers = max_peers
        self.idle_seconds = idle_seconds
        self.cursor_interval = cursor_interval
        self.commit_delay = commit_delay
        self.max_message_bytes = max_message_bytes
        self.message_rate = message_rate
        self.message_burst = message_burst
        self.clock = clock
        self.docs: dict[str, LiveDoc] = {}
        # Cluster mode: several nodes append to one log per document.
        self.shared = hub.backplane.name != "memory"
        self.peer_ttl = 15.0  # a node's peers are forgotten this long after it last announced them
        self._beat: asyncio.Future[None] | None = None
        # Cluster mode: a leader per document (the node holding its lease) orders
        # its ops; without leases (or leader_ttl 0) every node appends itself.
        self._lease = lease if self.shared and leader_ttl > 0 else None
        self.leader_ttl = leader_ttl
        self._leading: asyncio.Future[None] | None = None
        on_resync = getattr(hub.backplane, "on_resync", None)
        if on_resync is not None:
            on_resync(self.resync)
        self._feeds: dict[str, DocFeed] = {}
        self._loading: dict[str, tuple[asyncio.Future[LiveDoc | None], bool]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._stopping = False
        # counters for /metrics
        self.ops_applied = 0
        self.ops_duplicate = 0
        self.ops_refused: dict[str, int] = {}
        self.snapshots_written = 0
        self.commit_failures = 0
        self.docs_loaded = 0
        self.remote_ops = 0  # applied from other nodes (cluster mode)
        self.rebases = 0  # times our own ops were transformed over other nodes' (cluster mode)
        self.forwarded_ops = 0  # sent to a document's leader on another node
        self.ops_for_others = 0  # forwarded to us as the leader, applied here
        self.leader_changes = 0  # documents this node took the lead of

    @property
    def limits(self) -> dict[str, Any]:
        return {
            "max_doc_size": self.max_doc_size,
            "max_op_size": self.max_op_size,
            "edit_rate": self.edit_rate,
            "edit_burst": self.edit_burst,
            "max_message_bytes": self.max_message_bytes,
            "rate": self.message_rate,
            "burst": self.message_burst,
        }

    def _state_limits(self) -> dict[str, int]:
        return {"max_log": self.log_keep, "max_op_size": self.max_op_size, "max_doc_size": self.max_doc_size}

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        if self.shared:
            self._beat = asyncio.ensure_future(self._announce_peers())
        if self._lease is not None:
            self._leading = asyncio.ensure_future(self._renew_leases())

    async def _announce_peers(self) -> None:
        """Every ``peer_ttl / 3``: tell the other nodes who edits here, and
        forget (with a ``peer_left``) the peers of a node that went quiet."""
        while True:
            await asyncio.sleep(self.peer_ttl / 3)
            now = self.clock()
            for doc in list(self.docs.values()):
                for peer in doc.announced():
                    self.hub.send_others(doc.topic, Outgoing({"type": PEER_ANNOUNCE, **peer.info()}))
                for client, (info, heard) in list(doc.remote_peers.items()):
                    if now - heard > self.peer_ttl:
                        del doc.remote_peers[client]
                        self._publish_local(doc, {"type": "peer_left", "client": client, "user": info["user"]})

    def resync(self) -> None:
        """The backplane was cut off and is back: what other nodes committed
        meanwhile may not have arrived; every open document reads the log."""
        for doc in list(self.docs.values()):
            if not doc.broken:
                if doc.writing:
                    doc.conflict = True
                else:
                    self._start_rebase(doc)
                self._resend_forwarded(doc, everything=True)  # the leader may not have had them

    def _remote_peer(self, doc: LiveDoc, kind: str | None, out: Outgoing) -> None:
        obj = out.obj
        client = obj.get("client")
        if kind == PEER_QUERY:
            for peer in doc.announced():
                self.hub.send_others(doc.topic, Outgoing({"type": PEER_ANNOUNCE, **peer.info()}))
            return
        if not isinstance(client, str) or client in doc.peers:
            return  # our own peer (a local publish comes back here too)
        if kind == "peer_left":
            doc.remote_peers.pop(client, None)
            return
        info = {k: obj[k] for k in ("client", "user", "color") if k in obj}
        new = client not in doc.remote_peers
        doc.remote_peers[client] = (info, self.clock())
        if kind == PEER_ANNOUNCE and new:
            # A peer we had not heard of (we loaded the document after it joined): tell ours.
            self._publish_local(doc, {"type": "peer_joined", **info})

    def _publish_local(self, doc: LiveDoc, obj: dict[str, Any]) -> None:
        out = Outgoing(obj, client=obj.get("client"))
        for topic in (doc.topic, doc.topic16):
            self.hub.dispatch(topic, out)

    async def stop(self) -> None:
        """Write what is queued, snapshot every open document, forget them."""
        self._stopping = True
        for task in (self._beat, self._leading):
            if task is not None:
                task.cancel()
        docs = list(self.docs.values())
        for doc in docs:
            if doc.evict_handle is not None:
                doc.evict_handle.cancel()
                doc.evict_handle = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while any(d.batch or d.writing for d in docs if not d.broken) and loop.time() < deadline:
            for doc in docs:
                self._flush(doc)
            await asyncio.sleep(0.005)
        for doc in docs:
            for peer in list(doc.peers.values()):
                self._cancel_cursor(peer)
            if not doc.broken and doc.state.rev > doc.snapshot_rev:
                self._save_snapshot(doc)
            self._let_go(doc)  # another node takes the lead now, not a lease's lifetime later
        self.docs.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # -- loading -------------------------------------------------------------------

    async def open_doc(self, doc_id: str, create: bool = True) -> LiveDoc | None:
        """The live document, loaded from the store on first use.

        ``create``: make a new empty document if there is none (refused past
        ``max_docs`` with ``ProtocolError("too_large")``); otherwise ``None``
        for a document that does not exist.
        """
        if not valid_doc_id(doc_id):
            raise ProtocolError("bad_message", DOC_ID_RULE)
        for _ in range(3):  # a non-creating load may be in flight when we need to create
            doc = self.docs.get(doc_id)
            if doc is not None:
                return doc
            pending = self._loading.get(doc_id)
            if pending is None:
                fut = asyncio.ensure_future(self._load(doc_id, create))
                self._loading[doc_id] = (fut, create)
                fut.add_done_callback(partial(self._loading_done, doc_id))
                pending = (fut, create)
            doc = await asyncio.shield(pending[0])
            if doc is not None or not create or pending[1]:
                return doc
        raise ProtocolError("unavailable", "the document is being loaded; retry")

    def _loading_done(self, doc_id: str, fut: asyncio.Future[Any]) -> None:
        if self._loading.get(doc_id, (None,))[0] is fut:
            del self._loading[doc_id]
        if not fut.cancelled():
            fut.exception()  # retrieved: the awaiting callers (if any) get it through shield()

    async def _load(self, doc_id: str, create: bool) -> LiveDoc | None:
        if self.shared and doc_id not in self._feeds:
            # Subscribed before reading the log: an op another node appends
            # meanwhile arrives here (or shows as a gap, filled from the log).
            feed = self._feeds[doc_id] = DocFeed(self, doc_id)
            try:
                await self.hub.subscribe(_doc_topic(doc_id), feed)
            except BaseException:
                self._drop_feed(doc_id)
                raise ProtocolError("unavailable", "the document could not be opened; retry shortly",
                                    close=Close.TRY_AGAIN) from None
        try:
            loaded = await self.log.load(doc_id, create=create, max_docs=self.max_docs, keep=self.log_keep)
        except TooManyDocuments:
            raise ProtocolError(
                "too_large", f"this server already holds {self.max_docs} documents; open an existing one",
                close=Close.POLICY) from None
        except StoreBusy:
            raise ProtocolError("unavailable", "the server is overloaded; retry shortly", close=Close.TRY_AGAIN)
        except StorageError:
            raise ProtocolError("unavailable", "the document could not be read; retry shortly",
                                close=Close.TRY_AGAIN) from None
        if loaded is None:
            self._drop_feed(doc_id)
            return None
        existing = self.docs.get(doc_id)
        if existing is not None:
            return existing
        state, snap_rev, owners = build_state(doc_id, loaded, **self._state_limits())
        doc = LiveDoc(state, snap_rev, owners, loaded.updated)
        if self._lease is not None:
            doc.lease = self._lease("doc:" + doc_id, self.leader_ttl)
            doc.leader = await doc.lease.renew()
            existing = self.docs.get(doc_id)
            if existing is not None:
                if doc.leader:
                    await doc.lease.stop()
                return existing
            if doc.leader:
                self.leader_changes += 1
        self.docs[doc_id] = doc
        if self.shared:
            self.hub.send_others(doc.topic, Outgoing({"type": PEER_QUERY}))
        self.docs_loaded += 1
        if not doc.peers:
            self._schedule_evict(doc)
        return doc

    def _schedule_evict(self, doc: LiveDoc) -> None:
        if doc.evict_handle is not None:
            doc.evict_handle.cancel()
        doc.evict_handle = asyncio.get_running_loop().call_later(self.idle_seconds, self._evict, doc)

    def _evict(self, doc: LiveDoc) -> None:
        doc.evict_handle = None
        if self.docs.get(doc.id) is not doc:
            return
        if doc.busy:
            if not doc.peers:
                self._schedule_evict(doc)
            return
        del self.docs[doc.id]
        self._drop_feed(doc.id)
        self._let_go(doc)
        if not doc.broken and doc.state.rev == 0:
            # Opened and never edited: not kept, so empty documents cannot
            # fill max_docs (the next open creates it afresh).
            self._background_task(self.log.drop_if_empty(doc.id))
        elif not doc.broken and doc.state.rev > doc.snapshot_rev:
            self._save_snapshot(doc)

    def _background_task(self, coro: Any) -> None:
        fut = asyncio.ensure_future(coro)
        self._background.add(fut)

        def done(f: asyncio.Future[Any]) -> None:
            self._background.discard(f)
            if not f.cancelled() and f.exception() is not None:
                log.warning("could not remove an empty document: %s", f.exception())

        fut.add_done_callback(done)

    def _save_snapshot(self, doc: LiveDoc) -> None:
        data = ujson.dumps(doc.state.to_snapshot(include_log=False), ensure_ascii=False)
        try:
            fut = asyncio.ensure_future(self.log.save_snapshot(doc.id, doc.state.rev, data, self.log_keep))
        except StorageError:
            return  # only a shortcut for the next load: the log has everything
        doc.snapshot_rev = doc.state.rev

        def done(f: asyncio.Future[Any]) -> None:
            self._background.discard(f)
            if not f.cancelled() and f.exception() is None and f.result():
                self.snapshots_written += 1

        self._background.add(fut)
        fut.add_done_callback(done)

    # -- peers ---------------------------------------------------------------------

    async def attach(self, member: Member, doc_id: str, want_client: str | None = None,
                     units: str = CODEPOINT, may_create: Callable[[], bool] | None = None) -> Peer:
        """Open (or create) ``doc_id`` and add ``member`` as a peer, not yet announced.

        Then call :meth:`welcome`.  ``want_client`` (from ``?client=``) is the
        client id the member had before a reconnect: it is reused when no one
        else's connection holds it, so its resent op is recognised; otherwise
        the member gets a fresh id.  ``units``: what the member's positions
        count (``"codepoint"`` or ``"utf16"``).  ``may_create`` is asked only
        when the document does not exist yet: refused, ``rate_limited`` and close 1008.
        """
        doc = await self.open_doc(doc_id, create=may_create is None)
        if doc is None:  # a new document: creating it is charged (an existing one never is)
            if may_create is not None and not may_create():
                raise ProtocolError("rate_limited", "creating documents is limited per address and this one is over"
                                    " its budget; open an existing document, or retry in a minute", close=Close.POLICY)
            doc = await self.open_doc(doc_id, create=True)
        assert doc is not None
        if len(doc.peers) >= self.max_peers:
            raise ProtocolError(
                "unavailable", f"this document already has {self.max_peers} people in it; try again later",
                close=Close.TRY_AGAIN)
        user = member.user
        client_id = None
        if want_client is not None and valid_client_id(want_client):
            holder = doc.peers.get(want_client)
            owner = doc.owners.get(want_client)
            if (owner is None or owner == user.id) and (holder is None or holder.user.id == user.id):
                client_id = want_client
                if holder is not None:  # our own stale connection, not yet noticed as dead
                    self.leave(holder)
                    holder.member.close(Close.POLICY, "replaced by a newer connection of this client")
        if client_id is None:
            client_id = new_client_id()
            while client_id in doc.peers or client_id in doc.owners:
                client_id = new_client_id()
        peer = Peer(member, doc, client_id, pick_color(p.color for p in doc.peers.values()),
                    TokenBucket(self.edit_rate, self.edit_burst, self.clock), units)
        doc.peers[client_id] = peer
        doc.remember_owner(client_id, user.id)
        if doc.evict_handle is not None:
            doc.evict_handle.cancel()
            doc.evict_handle = None
        try:
            await self.hub.subscribe(_topic(peer), peer)
        except BaseException as e:
            self.leave(peer)
            if isinstance(e, ConnectionError):  # the backplane is unreachable (cluster mode)
                raise ProtocolError("unavailable", "the document could not be opened; retry shortly",
                                    close=Close.TRY_AGAIN) from None
            raise
        return peer

    async def welcome(self, peer: Peer, since: int | None = None) -> None:
        """Send the peer its starting point, announce it, release held messages.

        With ``since`` (the rev the client had) and the log still holding every
        op after it: an ``ops`` message with them.  Otherwise a ``snapshot``.
        Either is sent once its revision has committed.
        """
        doc = peer.doc
        while True:
            # What is sent is taken from memory, then sent once it has committed;
            # if the document rebased meanwhile (cluster mode), that picture
            # changed: take it again.
            rebases = doc.rebases
            rev, text, entries, peers = self._starting_point(peer, since)
            try:
                await doc.until_committed(rev)
            except Unavailable:
                raise ProtocolError("unavailable", "the document could not be saved; reconnect",
                                    close=Close.SERVER_ERROR) from None
            if doc.rebases == rebases:
                break
        if peer.gone:
            return
        msg: dict[str, Any]
        if entries is not None:
            msg = {"type": "ops", "doc": doc.id, "rev": rev, "ops": [entry_json(e) for e in entries]}
        else:
            msg = {"type": "snapshot", "doc": doc.id, "rev": rev, "text": text}
        msg.update(client=peer.client_id, user=peer.user_json, color=peer.color, peers=peers,
                   readonly=not peer.can_edit, limits=self.limits, units=peer.units)
        peer.after_rev = rev
        peer.member.send(msg)
        peer.joined = True
        self._publish(doc, {"type": "peer_joined", **peer.info()}, client=peer.client_id)
        peer.release()

    def _starting_point(self, peer: Peer, since: int | None
                        ) -> tuple[int, str, list[LogEntry] | None, list[dict[str, Any]]]:
        doc = peer.doc
        state = doc.state
        rev, text = state.rev, state.text
        entries = state.ops_since(since, peer.units) if since is not None else None
        to_peer = state.text_units().to_utf16 if peer.units == UTF16 else None
        peers = []
        for other in doc.announced():
            info = other.info()
            if other.cursor is not None:
                moved = self._move(doc, other.cursor[0], other.cursor[1:], rev)
                if moved is not None:
                    if to_peer is not None:
                        moved = (to_peer(moved[0]), to_peer(moved[1]))
                    info["cursor"] = {"anchor": moved[0], "head": moved[1]}
            peers.append(info)
        peers.extend(info for info, _ in doc.remote_peers.values())
        return rev, text, entries, peers

    def leave(self, peer: Peer) -> None:
        """Remove ``peer`` (idempotent); announce it if it was announced."""
        if peer.gone:
            return
        peer.gone = True
        doc = peer.doc
        self.hub.unsubscribe(_topic(peer), peer)
        self._cancel_cursor(peer)
        if doc.peers.get(peer.client_id) is peer:
            del doc.peers[peer.client_id]
            doc.forwarded.pop(peer.client_id, None)  # the leader may still apply it; nobody to ack
        if peer.joined and not doc.broken:
            self._publish(doc, {"type": "peer_left", "client": peer.client_id, "user": peer.user_json},
                          client=peer.client_id)
        if not doc.peers and not doc.broken and self.docs.get(doc.id) is doc and not self._stopping:
            self._schedule_evict(doc)

    # -- edits -----------------------------------------------------------------------

    def submit(self, peer: Peer, base_rev: Any, op: Any, seq: Any) -> None:
        """Apply the peer's op in memory now; ack and broadcast once it has committed.

        Raises :class:`~realtime.protocol.ProtocolError` (nothing changed):
        ``bad_message``, ``conflict``, ``too_large``, ``rate_limited``,
        ``forbidden`` or ``unavailable``.
        """
        doc = peer.doc
        try:
            if peer.gone or doc.broken:
                raise ProtocolError("unavailable", "the document is being reloaded; reconnect")
            if not peer.joined:
                raise ProtocolError("conflict", "wait for the snapshot before sending ops")
            if not peer.can_edit:
                raise ProtocolError("forbidden", "you may view this document but not edit it")
            if not peer.bucket.take():
                raise ProtocolError(
                    "rate_limited", f"more than {self.edit_rate:g} edits per second; resend this op shortly")
            if self.log.overloaded:
                raise ProtocolError("unavailable", "the server is overloaded; resend this op shortly")
        except ProtocolError as exc:
            self.ops_refused[exc.code] = self.ops_refused.get(exc.code, 0) + 1
            raise
        if not doc.leader:  # another node orders this document's ops
            self._forward(doc, Forwarded(peer, base_rev, op, seq, self.clock()))
        elif doc.rebasing:  # catching up with another node: taken in order right after
            doc.deferred.append(partial(self._apply_later, peer, base_rev, op, seq))
        else:
            self._apply(peer, base_rev, op, seq)

    def _apply_later(self, peer: Peer, base_rev: Any, op: Any, seq: Any) -> None:
        """An op admitted earlier (its edit_rate token is spent): applied now, errors to its sender."""
        if peer.gone:
            return
        try:
            self._apply(peer, base_rev, op, seq)
        except ProtocolError as exc:
            err: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
            if type(seq) is int:
                err["seq"] = seq  # as for an op refused on arrival: the client knows which one
            peer.member.send(err)

    def _apply(self, peer: Peer, base_rev: Any, op: Any, seq: Any) -> None:
        """The part of :meth:`submit` after the admission checks (rights, rate, load)."""
        doc = peer.doc
        try:
            result = doc.state.submit(base_rev, op, peer.client_id, seq, units=peer.units)
        except ProtocolError as exc:
            self.ops_refused[exc.code] = self.ops_refused.get(exc.code, 0) + 1
            raise
        if result.duplicate:
            self.ops_duplicate += 1

            def ack_again(exc: BaseException | None, rev: int = result.rev) -> None:
                if exc is None and not peer.gone:
                    peer.member.send({"type": "ack", "rev": rev, "seq": seq, "duplicate": True})

            doc.when_committed(result.rev, ack_again)
            return
        assert result.op is not None and result.op16 is not None
        self._append(doc, Pending(result.rev, result.op, peer, peer.client_id, seq, peer.user.id,
                                  len(doc.state.text), result.op16, base_rev, op, peer.units))

    def _append(self, doc: LiveDoc, pending: Pending) -> None:
        doc.batch.append(pending)
        if pending.rev % self.snapshot_every == 0:
            doc.snapshots.append(
                (pending.rev, ujson.dumps(doc.state.to_snapshot(include_log=False), ensure_ascii=False)))
            doc.snapshot_rev = pending.rev
        if doc.flush_handle is None and not doc.writing:
            self._schedule_flush(doc)

    def _schedule_flush(self, doc: LiveDoc) -> None:
        loop = asyncio.get_running_loop()
        wait = doc.last_write + self.commit_delay - loop.time()
        if wait > 0:
            doc.flush_handle = loop.call_later(wait, self._flush, doc)
        else:
            doc.flush_handle = loop.call_soon(self._flush, doc)

    def _flush(self, doc: LiveDoc) -> None:
        """Hand the ops of ``doc`` applied so far to the store as one write.

        One write per document is with the store at a time, and writes start
        at least ``commit_delay`` apart: ops that arrive meanwhile go into the
        next one.  Under load a write carries several ops, so their acks and
        broadcasts go out together: one socket write per peer for several ops
        instead of one each (that, not the commit, is most of the cost of an
        op in a busy document).
        """
        if doc.flush_handle is not None:
            doc.flush_handle.cancel()
            doc.flush_handle = None
        if doc.broken or not doc.batch or doc.writing:
            return
        batch, doc.batch = doc.batch, []
        snapshots, doc.snapshots = doc.snapshots, []
        ts = now_ms()
        ops = [StoredOp(p.rev, ujson.dumps(p.op, ensure_ascii=False), p.client, p.seq, p.user_id) for p in batch]
        try:
            fut = asyncio.ensure_future(self.log.append(doc.id, ops, batch[-1].length, ts, snapshots, self.log_keep))
        except StorageError as exc:
            self._fail(doc, exc)
            return
        doc.inflight.extend(batch)
        doc.updated = ts
        doc.writing = True
        doc.last_write = asyncio.get_running_loop().time()
        # The batch holds every op applied since the last flush: the text now is the one after it.
        fut.add_done_callback(partial(self._committed, doc, batch[-1].rev, len(snapshots), doc.state.text))

    def _committed(self, doc: LiveDoc, last: int, snapshots: int, text: str, fut: asyncio.Future[None]) -> None:
        doc.writing = False
        if doc.broken:
            return
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is not None:
            if self.shared and isinstance(exc, LogGap):
                if "turn" in str(exc):
                    # A node that lost the race has the next append: try again once it had it.
                    doc.conflict = True
                    doc.flush_handle = asyncio.get_running_loop().call_later(0.005, self._start_rebase, doc)
                    return
                self._start_rebase(doc)  # another node appended first: transform ours over its ops
                return
            self._fail(doc, exc)
            return
        self.snapshots_written += snapshots
        if last > doc.committed_rev:
            doc.committed_rev = last
            doc.committed_text = text
        while doc.inflight and doc.inflight[0].rev <= last:
            p = doc.inflight.popleft()
            if p.peer is not None and not p.peer.gone:
                p.peer.member.send({"type": "ack", "rev": p.rev, "seq": p.seq})
            out = Outgoing({"type": "op", "rev": p.rev, "op": p.op, "client": p.client, "seq": p.seq},
                           seq=p.rev, client=p.client)
            self._deliver_op(doc, out, p.op16)
            self.hub.send_others(doc.topic, out)
            self.ops_applied += 1
        doc.run_waiters(doc.committed_rev)
        if doc.conflict and not doc.writing:
            self._start_rebase(doc)
        elif doc.batch and doc.flush_handle is None:
            self._schedule_flush(doc)

    def _deliver_op(self, doc: LiveDoc, out: Outgoing, op16: list[Any] | None) -> None:
        """Hand a committed op to this node's peers, encoded once per unit in use."""
        out16: Outgoing | None = None
        for peer in list(doc.peers.values()):
            if peer.units == UTF16:
                if out16 is None:
                    obj = out.obj
                    out16 = Outgoing({**obj, "op": op16 if op16 is not None else obj["op"]},
                                     seq=out.seq, client=out.client)
                peer.deliver_op(out16)
            else:
                peer.deliver_op(out)
        doc.delivered_rev = out.seq or doc.delivered_rev

    # -- several nodes, one log (cluster mode) ---------------------------------------

    def _remote_op(self, doc: LiveDoc, out: Outgoing) -> None:
        """An op another node committed.  Applied at once when it is the next
        revision and this node has nothing of its own in flight; otherwise (a
        gap, or our own ops now lose the race) the document rebases."""
        rev = out.seq
        assert rev is not None
        if doc.broken or rev <= doc.committed_rev:
            return
        if doc.rebasing:
            doc.conflict = True  # the rebase reads the log; it re-checks when done
            return
        idle = not doc.batch and not doc.inflight and not doc.writing
        if idle and rev == doc.committed_rev + 1:
            obj = out.obj
            state = doc.state
            try:
                op16 = state.text_units().op_to_utf16(obj["op"])
                state.apply_entry(rev, obj["op"], obj.get("client"), obj.get("seq"))
            except (ProtocolError, ot.OTError, KeyError, TypeError):
                self._start_rebase(doc)  # not what our copy expects: read the log
                return
            doc.committed_rev = rev
            doc.committed_text = state.text
            doc.updated = now_ms()
            self.remote_ops += 1
            self._deliver_op(doc, out, op16)
            if doc.forwarded:
                self._ack_forwarded(doc, rev, obj.get("client"), obj.get("seq"))
            doc.run_waiters(rev)
            return
        doc.conflict = True
        if not doc.writing:
            self._start_rebase(doc)

    def _start_rebase(self, doc: LiveDoc) -> None:
        if doc.rebasing or doc.broken:
            doc.conflict = True
            return
        if doc.flush_handle is not None:
            doc.flush_handle.cancel()
            doc.flush_handle = None
        doc.rebasing = True
        doc.conflict = False
        self._background_task(self._rebase(doc))

    async def _rebase(self, doc: LiveDoc) -> None:
        """Catch up with the log other nodes appended to, the way a client
        catches up with the server: read the ops after our last committed
        revision, hand them to our peers, transform our own not yet committed
        ops over them (ours arrived later, so ours go first on a tie, as on one
        node), and append those again.  Usually only the tail of the log is
        read; a full reload when the log no longer reaches back that far."""
        base = doc.committed_rev
        try:
            tail = await self.log.ops_since(doc.id, base)
            if doc.broken:
                return
            pending = list(doc.inflight) + doc.batch
            if tail is not None:
                state = doc.state
                state.rollback(base, doc.committed_text)
                remote: list[tuple[int, list[Any], list[Any], str | None, int | None]] = []
                for o in tail:
                    op = ujson.loads(o.op)
                    op16 = state.text_units().op_to_utf16(op)
                    state.apply_entry(o.rev, op, o.client, o.seq)
                    remote.append((o.rev, op, op16, o.client, o.seq))
                owners = {o.client: o.user_id for o in tail if o.client and o.user_id}
            else:
                loaded = await self.log.load(doc.id, create=False, max_docs=0, keep=self.log_keep)
                if loaded is None:
                    raise SnapshotError(f"document {doc.id} is gone from the store")
                state, _snap_rev, owners = build_state(doc.id, loaded, **self._state_limits())
                entries, entries16 = state.ops_since(base), state.ops_since(base, UTF16)
                if entries is None or entries16 is None:
                    raise SnapshotError(f"document {doc.id}: the log no longer reaches rev {base}")
                remote = [(e.rev, e.op, e16.op, e.client_id, e.seq) for e, e16 in zip(entries, entries16)]
                pending = list(doc.inflight) + doc.batch
            committed_text = state.text
            rebased: list[Pending] = []
            refused: list[tuple[Pending, ProtocolError]] = []
            for p in pending:
                if p.client is not None and p.seq is not None and state.seen(p.client, p.seq):
                    continue  # it did reach the log (an answer lost on the way)
                # Submitted again as the client sent it: transformed over every op
                # after its base, ours and the other nodes', in the log's order.
                try:
                    result = state.submit(p.base_rev, p.sent, p.client, p.seq, units=p.units)
                except ProtocolError as exc:  # e.g. its base left the log window: that edit alone
                    refused.append((p, exc))
                    continue
                assert result.op is not None and result.op16 is not None and not result.duplicate
                rebased.append(p._replace(rev=result.rev, op=result.op, op16=result.op16, length=len(state.text)))
        except Exception as exc:  # a broken log, an unreachable store: the single-node path
            doc.rebasing = False
            self._fail(doc, exc)
            return
        ours: dict[tuple[str | None, int | None], Pending] = {(p.client, p.seq): p for p in pending if p.client}
        for rev, op, op16, client, seq in remote:
            mine = ours.get((client, seq))
            if mine is not None and mine.peer is not None and not mine.peer.gone:
                # Our own write did reach the log (its answer was lost): acknowledge it now.
                mine.peer.member.send({"type": "ack", "rev": rev, "seq": seq})
            if rev > doc.delivered_rev:
                out = Outgoing({"type": "op", "rev": rev, "op": op, "client": client, "seq": seq},
                               seq=rev, client=client)
                self._deliver_op(doc, out, op16)
            if doc.forwarded:
                self._ack_forwarded(doc, rev, client, seq)
        for client, user in owners.items():
            doc.remember_owner(client, user)
        doc.state = state
        doc.committed_rev = state.rev - len(rebased)
        doc.committed_text = committed_text
        doc.inflight.clear()
        doc.batch = rebased
        doc.snapshots = []
        doc.writing = False
        doc.rebases += 1
        self.rebases += 1
        self.remote_ops += len(remote)
        doc.rebasing = False
        doc.run_waiters(doc.committed_rev)
        for p, why in refused:
            # Never acknowledged, and no longer mergeable: only its sender reconnects
            # (and reloads), not every peer of the document.
            log.warning("document %s: an edit of %s could not be merged after a rebase (%s)", doc.id, p.client,
                        why.message)
            if p.peer is not None and not p.peer.gone:
                peer = p.peer
                self.leave(peer)
                peer.member.close(Close.TRY_AGAIN, "your last edit could not be merged; reload")
            elif p.peer is None and p.client is not None:  # a follower's: it closes its peer
                self._reply(doc, p.client, p.seq, "your last edit could not be merged; reload", close=True)
        deferred, doc.deferred = doc.deferred, []
        for later in deferred:
            later()
        if doc.batch:
            # Append now, even if more arrived meanwhile: a losing append claims
            # the next turn in the log, while rebasing again first could go on
            # for as long as the other node keeps appending.
            self._schedule_flush(doc)
        elif doc.conflict:
            self._start_rebase(doc)

    # -- a leader per document (cluster mode) ------------------------------------------
    #
    # Each document has a leader: the node holding its lease in the store.  The
    # leader applies, appends and broadcasts every op, as a single node does;
    # the other nodes (followers) send their peers' ops to it over the hub and
    # acknowledge each one when its broadcast comes back, in rev order.  So two
    # nodes do not race for the log's next revision.  The compare-and-append
    # stays, so that while leadership changes hands (two nodes that both think
    # they lead, for a moment) the log still has one order: the loser rebases.

    def _forward(self, doc: LiveDoc, fwd: Forwarded) -> None:
        doc.forwarded.setdefault(fwd.peer.client_id, deque()).append(fwd)
        self.forwarded_ops += 1
        self._send_submit(doc, fwd)
        if doc.resend_handle is None:
            doc.resend_handle = asyncio.get_running_loop().call_later(FORWARD_RESEND, self._resend_due, doc)

    def _send_submit(self, doc: LiveDoc, fwd: Forwarded) -> None:
        peer = fwd.peer
        obj = {"type": SUBMIT, "rev": fwd.base_rev, "op": fwd.op, "seq": fwd.seq, "client": peer.client_id,
               "user": peer.user.id, "units": peer.units}
        self.hub.send_others(doc.topic, Outgoing(obj, client=peer.client_id))

    def _resend_due(self, doc: LiveDoc) -> None:
        doc.resend_handle = None
        if not doc.broken and self.docs.get(doc.id) is doc:
            self._resend_forwarded(doc)

    def _resend_forwarded(self, doc: LiveDoc, everything: bool = False) -> None:
        """Send again the forwarded ops the leader has not answered within
        ``FORWARD_RESEND`` (or all of them): the leader may have changed, or a
        message may have been lost.  The same ``(client, seq)`` is applied at
        most once; an op without a seq is never sent twice."""
        now = self.clock()
        for queue in doc.forwarded.values():
            for i, fwd in enumerate(queue):
                if type(fwd.seq) is int and (everything or now - fwd.sent_at >= FORWARD_RESEND):
                    queue[i] = fwd._replace(sent_at=now)
                    self._send_submit(doc, fwd)
        if doc.forwarded and doc.resend_handle is None and not doc.broken:
            doc.resend_handle = asyncio.get_running_loop().call_later(FORWARD_RESEND, self._resend_due, doc)

    def _settle(self, doc: LiveDoc, client: Any, seq: Any) -> Peer | None:
        """Forget the forwarded op ``(client, seq)``; its peer if it was waiting for that answer."""
        queue = doc.forwarded.get(client) if isinstance(client, str) else None
        if not queue:
            return None
        for i, fwd in enumerate(queue):
            if fwd.seq == seq:
                del queue[i]
                if not queue:
                    del doc.forwarded[client]
                return None if fwd.peer.gone else fwd.peer
        return None

    def _ack_forwarded(self, doc: LiveDoc, rev: int, client: Any, seq: Any) -> None:
        """The leader committed one of our peers' ops (its broadcast came back): that is the ack."""
        peer = self._settle(doc, client, seq)
        if peer is not None:
            peer.member.send({"type": "ack", "rev": rev, "seq": seq})

    def _forwarded_op(self, doc: LiveDoc, obj: dict[str, Any]) -> None:
        """A follower's op: applied here if this node leads the document (else
        ignored: the follower sends it again to whichever node leads)."""
        if not doc.leader or doc.broken or not valid_client_id(obj.get("client")):
            return
        if doc.rebasing:
            doc.deferred.append(partial(self._apply_forwarded, doc, obj))
        else:
            self._apply_forwarded(doc, obj)

    def _apply_forwarded(self, doc: LiveDoc, obj: dict[str, Any]) -> None:
        if doc.broken:
            return
        client, seq, base_rev, op = obj["client"], obj.get("seq"), obj.get("rev"), obj.get("op")
        units: str = obj["units"] if obj.get("units") in UNITS else CODEPOINT
        user = obj.get("user") if isinstance(obj.get("user"), str) else None
        try:
            if type(base_rev) is not int:
                raise ProtocolError("bad_message", "'rev' must be a revision number")
            result = doc.state.submit(base_rev, op, client, seq, units=units)
        except ProtocolError as exc:
            self.ops_refused[exc.code] = self.ops_refused.get(exc.code, 0) + 1
            err: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
            if type(seq) is int:
                err["seq"] = seq
            self._reply(doc, client, seq, err)
            return
        if result.duplicate:
            self.ops_duplicate += 1

            def ack_again(exc: BaseException | None, rev: int = result.rev) -> None:
                if exc is None:
                    self._reply(doc, client, seq, {"type": "ack", "rev": rev, "seq": seq, "duplicate": True})

            doc.when_committed(result.rev, ack_again)
            return
        assert result.op is not None and result.op16 is not None
        if user is not None:
            doc.remember_owner(client, user)
        self.ops_for_others += 1
        self._append(doc, Pending(result.rev, result.op, None, client, seq, user, len(doc.state.text),
                                  result.op16, base_rev, op, units))

    def _reply(self, doc: LiveDoc, client: str, seq: Any, msg: Any, close: bool = False) -> None:
        """The leader's answer to a follower's op that is not its broadcast:
        an error, the ack of a resend, or (``close``) "reload"."""
        self.hub.send_others(doc.topic, Outgoing(
            {"type": REPLY, "client": client, "seq": seq, "msg": msg, "close": close}, client=client))

    def _leader_reply(self, doc: LiveDoc, obj: dict[str, Any]) -> None:
        peer = self._settle(doc, obj.get("client"), obj.get("seq"))
        if peer is None:
            return  # not ours, or answered already (by the op's broadcast)
        msg = obj.get("msg")
        if obj.get("close"):
            self.leave(peer)
            peer.member.close(Close.TRY_AGAIN, str(msg)[:120])
        elif isinstance(msg, dict):
            peer.member.send(msg)

    async def _renew_leases(self) -> None:
        """Every ``leader_ttl / 3``: keep the leases of the documents this node
        leads, and try to take those whose leader stopped renewing."""
        while True:
            await asyncio.sleep(self.leader_ttl / 3)
            docs = [d for d in self.docs.values() if d.lease is not None and not d.broken]
            if docs:
                held = await asyncio.gather(*(d.lease.renew() for d in docs if d.lease is not None))
                for doc, h in zip(docs, held):
                    self._lead(doc, h)

    async def _renew_now(self, doc: LiveDoc) -> None:
        lease = doc.lease
        if lease is not None:
            self._lead(doc, await lease.renew())

    def _leader_gone(self, doc: LiveDoc) -> None:
        """The leader let go (it unloaded the document, or is stopping): take over now."""
        if doc.lease is not None and not doc.leader and not doc.broken:
            self._background_task(self._renew_now(doc))

    def _lead(self, doc: LiveDoc, held: bool) -> None:
        if self.docs.get(doc.id) is not doc or doc.broken:
            return
        if held and not doc.leader:
            doc.leader = True
            self.leader_changes += 1
            log.info("document %s: this node leads it now", doc.id)
            # What our peers sent to the old leader and it did not answer is ours
            # to apply, after catching up with the log (which may hold some of
            # it: those are recognised by their seq and acknowledged again).
            for queue in doc.forwarded.values():
                for fwd in queue:
                    doc.deferred.append(partial(self._apply_later, fwd.peer, fwd.base_rev, fwd.op, fwd.seq))
            doc.forwarded.clear()
            if doc.resend_handle is not None:
                doc.resend_handle.cancel()
                doc.resend_handle = None
            self._start_rebase(doc)
        elif not held and doc.leader and doc.idle_writer:
            doc.leader = False  # another node holds the lease: forward from now on

    def _let_go(self, doc: LiveDoc) -> None:
        """Give up the document's lease (unloaded, broken, or this node stops) and say so."""
        lease, doc.lease = doc.lease, None
        if lease is not None and lease.held:
            self._background_task(self._release(doc, lease))

    async def _release(self, doc: LiveDoc, lease: Lease) -> None:
        await lease.stop()
        self.hub.send_others(doc.topic, Outgoing({"type": LEADER_GONE}))

    def _drop_feed(self, doc_id: str) -> None:
        feed = self._feeds.pop(doc_id, None)
        if feed is not None:
            self.hub.unsubscribe(_doc_topic(doc_id), feed)

    def _fail(self, doc: LiveDoc, exc: BaseException) -> None:
        """A write failed: drop the document from memory and close its peers (they resume)."""
        self.commit_failures += 1
        log.error("document %s: saving rev %d.. failed (%r); closing %d peers, reloading from the store",
                  doc.id, doc.committed_rev + 1, exc, len(doc.peers))
        doc.broken = True
        if self.docs.get(doc.id) is doc:
            del self.docs[doc.id]
            self._drop_feed(doc.id)
        self._let_go(doc)
        if doc.resend_handle is not None:
            doc.resend_handle.cancel()
            doc.resend_handle = None
        doc.forwarded.clear()
        for handle in (doc.flush_handle, doc.evict_handle):
            if handle is not None:
                handle.cancel()
        doc.flush_handle = doc.evict_handle = None
        doc.batch.clear()
        doc.inflight.clear()
        doc.run_waiters(doc.committed_rev, Unavailable(str(exc)))
        for peer in list(doc.peers.values()):
            self.leave(peer)
            peer.member.close(Close.SERVER_ERROR, "the document could not be saved; reconnect")

    # -- cursors ---------------------------------------------------------------------

    def _move(self, doc: LiveDoc, rev: int, positions: tuple[int, ...], upto: int,
              units: str = CODEPOINT) -> tuple[int, ...] | None:
        return move_positions(doc.state, rev, positions, upto, units)

    def _publish(self, doc: LiveDoc, obj: dict[str, Any], client: str | None = None) -> None:
        """Send a message without positions to the document's peers of every unit (encoded once)."""
        out: Outgoing | None = None
        every_unit = self.shared  # the other nodes' peers may count either unit
        for topic in (doc.topic, doc.topic16):
            if every_unit or self.hub.subscribers(topic):
                out = self.hub.publish(topic, obj if out is None else out, client=client)

    def cursor(self, peer: Peer, rev: int, anchor: int, head: int) -> None:
        """Relay the peer's selection to the others at the latest committed rev.

        At most one relay per ``cursor_interval`` per peer; a newer selection
        within the interval replaces the waiting one (sent at the interval's
        end).  Positions count the peer's units; one inside a surrogate pair is
        ``bad_message``.  Raises :class:`ProtocolError` for a bad rev or range.
        """
        doc = peer.doc
        if not peer.joined:
            raise ProtocolError("conflict", "wait for the snapshot before sending cursors")
        if rev > doc.committed_rev:
            raise ProtocolError("conflict", f"rev {rev} is newer than the document (rev {doc.committed_rev})")
        try:
            moved = self._move(doc, rev, (anchor, head), doc.committed_rev, peer.units)
            if moved is not None and peer.units == UTF16:
                from_peer = doc.committed_units().from_utf16
                moved = (from_peer(moved[0]), from_peer(moved[1]))
        except ot.OTError as exc:  # units.SplitError
            raise ProtocolError("bad_message", f"the cursor would split a character: {exc}") from None
        if moved is None:
            raise ProtocolError("conflict", f"rev {rev} is too old for a cursor (oldest kept: {doc.state.log_start})")
        peer.cursor = (doc.committed_rev, moved[0], moved[1])
        if peer.cursor_timer is not None:
            return
        wait = peer.cursor_sent + self.cursor_interval - self.clock()
        if wait <= 0:
            self._relay_cursor(peer)
        else:
            peer.cursor_timer = asyncio.get_running_loop().call_later(wait, self._cursor_due, peer)

    def _cursor_due(self, peer: Peer) -> None:
        peer.cursor_timer = None
        if not peer.gone and not peer.doc.broken:
            self._relay_cursor(peer)

    def _relay_cursor(self, peer: Peer) -> None:
        doc = peer.doc
        if peer.cursor is None:
            return
        rev, anchor, head = peer.cursor
        if rev != doc.committed_rev:
            moved = self._move(doc, rev, (anchor, head), doc.committed_rev)
            if moved is None:
                return
            anchor, head = moved
            peer.cursor = (doc.committed_rev, anchor, head)
        peer.cursor_sent = self.clock()
        msg = {"type": "cursor", "client": peer.client_id, "user": peer.user_json,
               "color": peer.color, "rev": doc.committed_rev, "anchor": anchor, "head": head}
        every_unit = self.shared
        if every_unit or self.hub.subscribers(doc.topic):
            self.hub.publish(doc.topic, msg, seq=doc.committed_rev, client=peer.client_id)
        if every_unit or self.hub.subscribers(doc.topic16):
            to16 = doc.committed_units().to_utf16
            self.hub.publish(doc.topic16, {**msg, "anchor": to16(anchor), "head": to16(head)},
                             seq=doc.committed_rev, client=peer.client_id)

    def _cancel_cursor(self, peer: Peer) -> None:
        if peer.cursor_timer is not None:
            peer.cursor_timer.cancel()
            peer.cursor_timer = None

    # -- reading (HTTP) ----------------------------------------------------------------

    async def list_docs(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Stored documents, most recently edited first (committed values)."""
        try:
            rows = await self.log.list(limit)
        except StorageError:
            raise ProtocolError("unavailable", "documents could not be listed; retry shortly") from None
        out = []
        for doc_id, rev, length, created, updated in rows:
            live = self.docs.get(doc_id)
            out.append({"id": doc_id, "rev": rev, "length": length, "created": created, "updated": updated,
                        "peers": len(live.announced()) if live is not None else 0})
        return out

    async def get_doc(self, doc_id: str) -> dict[str, Any]:
        """Text and rev of ``doc_id`` as last committed; ``ProtocolError("not_found")`` if it never existed."""
        doc = await self.open_doc(doc_id, create=False)
        if doc is None:
            raise ProtocolError("not_found", f"no document named {doc_id}")
        rev, text = doc.state.rev, doc.state.text
        try:
            await doc.until_committed(rev)
        except Unavailable:
            raise ProtocolError("unavailable", "the document is being reloaded; retry") from None
        return {"id": doc_id, "rev": rev, "text": text, "length": len(text), "updated": doc.updated,
                "peers": len(doc.announced())}

    # -- metrics -----------------------------------------------------------------------

    def metrics(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("realtime_docs_open", "Documents loaded in memory", len(self.docs))
        yield GaugeMetricFamily("realtime_doc_peers", "Connections editing a document",
                                sum(len(d.peers) for d in self.docs.values()))
        yield CounterMetricFamily("realtime_doc_ops_applied", "Edits committed and broadcast", self.ops_applied)
        yield CounterMetricFamily("realtime_doc_ops_duplicate", "Resent edits acknowledged again",
                                  self.ops_duplicate)
        refused = CounterMetricFamily("realtime_doc_ops_refused", "Edits refused, by error code", labels=["code"])
        for code, n in sorted(self.ops_refused.items()):
            refused.add_metric([code], n)
        yield refused
        yield CounterMetricFamily("realtime_doc_snapshots_written", "Document snapshots written",
                                  self.snapshots_written)
        yield CounterMetricFamily("realtime_doc_commit_failures", "Document writes that failed (peers closed 1011)",
                                  self.commit_failures)
        yield CounterMetricFamily("realtime_docs_loaded", "Documents loaded from the store", self.docs_loaded)
        yield CounterMetricFamily("realtime_doc_remote_ops", "Edits other nodes committed, applied here",
                                  self.remote_ops)
        yield CounterMetricFamily("realtime_doc_rebases", "Times this node's edits were transformed over "
                                  "other nodes' and appended again", self.rebases)
        yield CounterMetricFamily("realtime_doc_forwarded_ops", "Edits sent to the document's leader on "
                                  "another node", self.forwarded_ops)
        yield CounterMetricFamily("realtime_doc_ops_for_others", "Edits other nodes forwarded to this node "
                                  "as the document's leader, applied here", self.ops_for_others)
        yield CounterMetricFamily("realtime_doc_leader_changes", "Times this node took the lead of a document",
                                  self.leader_changes)
        yield GaugeMetricFamily("realtime_docs_led", "Open documents this node leads (orders their edits)",
                                sum(1 for d in self.docs.values() if d.leader))


def _doc_topic(doc_id: str) -> str:
    return "doc:" + doc_id


def _topic(peer: Peer) -> str:
    return peer.doc.topic16 if peer.units == UTF16 else peer.doc.topic


def entry_json(entry: LogEntry) -> dict[str, Any]:
    return {"rev": entry.rev, "op": entry.op, "client": entry.client_id, "seq": entry.seq}
