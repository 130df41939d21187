"""What a node holds of an open document, with no I/O: peers, pending ops, waiters.

:class:`LiveDoc` wraps a :class:`~realtime.documents.DocumentState` (the pure OT
authority) with what the service needs around it: the peers (:class:`Peer`,
one per connection, reached through the small :class:`Member` protocol), the
ops applied in memory and not yet committed (:class:`Pending`), and the
callbacks waiting for a revision to commit.  Also the small pure helpers the
service uses: client ids, colours, moving cursor positions across revisions.
Nothing here reads or writes a store or a socket.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterator, NamedTuple, Protocol

from realtime import ot
from realtime.auth import Identity
from realtime.documents import DocumentState, LogEntry
from realtime.limits import TokenBucket
from realtime.protocol import Outgoing, ProtocolError
from realtime.storage.base import Lease
from realtime.units import CODEPOINT, UTF16, TextUnits, utf16_length

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



# -- live documents -----------------------------------------------------------------


class Member(Protocol):
    """A connection as the editing core sees it (handlers.editing's socket)."""

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
        self.remote_cursors: dict[str, tuple[int, int, int]] = {}  # their selections: (rev, anchor, head), code points
        self.deferred: list[Callable[[], None]] = []  # ops that arrived during a rebase, applied after it
        # Cluster mode with a leader per document (realtime.editing.leader): the
        # node holding the lease applies and appends every op; the others
        # forward theirs to it.
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


def entry_json(entry: LogEntry) -> dict[str, Any]:
    return {"rev": entry.rev, "op": entry.op, "client": entry.client_id, "seq": entry.seq}
