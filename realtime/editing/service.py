"""The editing service: documents, their durable op logs, peers and cursors.

The contracts it keeps (order, then durability; clients only see committed
revisions; dedupe; units; snapshots) are in :mod:`realtime.editing`.  What it
holds in memory is in :mod:`realtime.editing.live`; what it does when several
nodes share one log, in :mod:`realtime.editing.cluster`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any, Callable, Iterator

import ujson

from realtime import ot
from realtime.documents import LogEntry, valid_doc_id
from realtime.editing.cluster import ClusterSync
from realtime.editing.leader import Leadership
from realtime.editing.live import (
    DOC_ID_RULE,
    LiveDoc,
    Member,
    Peer,
    Pending,
    Unavailable,
    entry_json,
    move_positions,
    new_client_id,
    now_ms,
    pick_color,
    valid_client_id,
)
from realtime.editing.replay import build_state
from realtime.hub import Hub
from realtime.limits import TokenBucket
from realtime.protocol import Close, Outgoing, ProtocolError
from realtime.storage.base import DocumentLog, Lease, LogGap, StorageError, StoreBusy, StoredOp, TooManyDocuments
from realtime.units import CODEPOINT, UTF16

log = logging.getLogger("realtime.editing")


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
        self.cluster = ClusterSync(self)
        # A leader per document, by a lease in the store (cluster mode; leader_ttl 0: every node appends).
        self.leadership = Leadership(self, lease if self.shared and leader_ttl > 0 else None, leader_ttl)
        on_resync = getattr(hub.backplane, "on_resync", None)
        if on_resync is not None:
            on_resync(self.cluster.resync)
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
            self.cluster.start()
            self.leadership.start()

    async def stop(self) -> None:
        """Write what is queued, snapshot every open document, forget them."""
        self._stopping = True
        self.cluster.stop()
        self.leadership.stop()
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
            self.leadership.let_go(doc)  # another node leads it now, not a lease's lifetime later
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
        if self.shared:
            await self.cluster.follow(doc_id)
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
            self.cluster.drop_feed(doc_id)
            return None
        existing = self.docs.get(doc_id)
        if existing is not None:
            return existing
        state, snap_rev, owners = build_state(doc_id, loaded, **self._state_limits())
        doc = LiveDoc(state, snap_rev, owners, loaded.updated)
        if self.leadership.enabled:
            await self.leadership.claim(doc)
            existing = self.docs.get(doc_id)
            if existing is not None:  # loaded meanwhile by another caller
                self.leadership.let_go(doc)
                return existing
        self.docs[doc_id] = doc
        if self.shared:
            self.cluster.query_peers(doc)
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
        self.cluster.drop_feed(doc.id)
        self.leadership.let_go(doc)
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
        peers = []
        for other in doc.announced():
            peers.append(self._with_cursor(doc, other.info(), other.cursor, peer.units))
        for client, (info, _) in doc.remote_peers.items():
            peers.append(self._with_cursor(doc, dict(info), doc.remote_cursors.get(client), peer.units))
        return rev, text, entries, peers

    def _with_cursor(self, doc: LiveDoc, info: dict[str, Any], cursor: tuple[int, int, int] | None,
                     units: str) -> dict[str, Any]:
        """``info`` with ``cursor`` ({anchor, head}) moved to the document's rev
        in ``units``, if it has a selection there (one set at a rev this node
        has not reached yet has none until it moves again)."""
        state = doc.state
        if cursor is not None and cursor[0] <= state.rev:
            moved = self._move(doc, cursor[0], cursor[1:], state.rev)
            if moved is not None:
                if units == UTF16:
                    to_peer = state.text_units().to_utf16
                    moved = (to_peer(moved[0]), to_peer(moved[1]))
                info["cursor"] = {"anchor": moved[0], "head": moved[1]}
        return info

    def send_remote_cursor(self, doc: LiveDoc, info: dict[str, Any]) -> None:
        """Tell this node's peers where another node's peer (just heard of) has its selection."""
        cursor = doc.remote_cursors.get(info["client"])
        if cursor is None or cursor[0] > doc.committed_rev:
            return
        moved = self._move(doc, cursor[0], cursor[1:], doc.committed_rev)
        if moved is None:
            return
        msg = {"type": "cursor", **info, "rev": doc.committed_rev, "anchor": moved[0], "head": moved[1]}
        self._send_cursor(doc, msg, lambda topic, obj: self.hub.dispatch(
            topic, Outgoing(obj, seq=doc.committed_rev, client=info["client"])), every_unit=False)

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
            if self.shared and not self.hub.backplane.healthy:
                # Applied now, it could not be stored: the document would be reloaded and
                # every peer closed. Refused, it is resent (same seq) once Redis is back.
                raise ProtocolError("unavailable", "the store (Redis) is unreachable; resend this op shortly")
        except ProtocolError as exc:
            self.ops_refused[exc.code] = self.ops_refused.get(exc.code, 0) + 1
            raise
        if not doc.leader:  # another node orders this document's ops
            self.leadership.forward(doc, peer, base_rev, op, seq)
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
                    doc.flush_handle = asyncio.get_running_loop().call_later(0.005, self.cluster.start_rebase, doc)
                    return
                self.cluster.start_rebase(doc)  # another node appended first: transform ours over its ops
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
            self.cluster.start_rebase(doc)
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

    def _fail(self, doc: LiveDoc, exc: BaseException) -> None:
        """A write failed: drop the document from memory and close its peers (they resume)."""
        self.commit_failures += 1
        log.error("document %s: saving rev %d.. failed (%r); closing %d peers, reloading from the store",
                  doc.id, doc.committed_rev + 1, exc, len(doc.peers))
        doc.broken = True
        if self.docs.get(doc.id) is doc:
            del self.docs[doc.id]
            self.cluster.drop_feed(doc.id)
        self.leadership.let_go(doc)
        self.leadership.forget(doc)
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
        self._send_cursor(doc, msg, lambda topic, obj: self.hub.publish(
            topic, obj, seq=doc.committed_rev, client=peer.client_id), every_unit=self.shared)

    def _send_cursor(self, doc: LiveDoc, msg: dict[str, Any], send: Callable[[str, dict[str, Any]], Any],
                     every_unit: bool) -> None:
        """``send(topic, message)`` a cursor (at the committed rev, in code points) to
        the peers counting each unit that has any here (``every_unit``: to both,
        the other nodes' peers may count either), converted for UTF-16 ones."""
        if every_unit or self.hub.subscribers(doc.topic):
            send(doc.topic, msg)
        if every_unit or self.hub.subscribers(doc.topic16):
            to16 = doc.committed_units().to_utf16
            send(doc.topic16, {**msg, "anchor": to16(msg["anchor"]), "head": to16(msg["head"])})

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
        yield from self.leadership.metrics()


def _topic(peer: Peer) -> str:
    return peer.doc.topic16 if peer.units == UTF16 else peer.doc.topic

