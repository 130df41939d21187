"""Several nodes, one log per document (cluster mode).

Each node keeps its own copy of an open document in memory.  Its
:class:`DocFeed` brings the ops the other nodes committed (and their peers'
comings and goings); :class:`ClusterSync` applies those ops to this node's copy
and hands them to its peers in revision order, and when this node's own append
lost the race (the store's compare-and-append refused it with
:class:`~realtime.storage.base.LogGap`) it rebases: reads the ops it missed,
transforms its own not yet committed ops over them
(:mod:`realtime.editing.replay`) and appends those again.

Between nodes only, the peer list is kept up to date with ``peer_query`` (a
node that loads a document asks who edits it elsewhere) and ``peer_announce``
(every ``peer_ttl / 3``, each node's peers; one not heard of for ``peer_ttl``
is forgotten with a ``peer_left``).  Clients never see either.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from realtime import ot
from realtime.documents import SnapshotError
from realtime.editing.live import (
    LEADER_GONE,
    PEER_ANNOUNCE,
    PEER_QUERY,
    REPLY,
    SUBMIT,
    LiveDoc,
    Pending,
    now_ms,
)
from realtime.editing.replay import build_state, ops_after, replay_tail, resubmit
from realtime.protocol import Close, Outgoing, ProtocolError

if TYPE_CHECKING:
    from realtime.editing.service import EditingService

log = logging.getLogger("realtime.editing")


class DocFeed:
    """A document's subscription to its topic on this node, for the ops other
    nodes committed (cluster mode): they go through :class:`ClusterSync`, which
    applies them to this node's copy and hands them to its peers in rev order."""

    __slots__ = ("cluster", "doc_id")

    def __init__(self, cluster: ClusterSync, doc_id: str) -> None:
        self.cluster = cluster
        self.doc_id = doc_id

    def deliver(self, out: Outgoing) -> None:
        doc = self.cluster.service.docs.get(self.doc_id)
        if doc is None:
            return
        kind = out.kind
        if kind == "op" and out.seq is not None:
            self.cluster.remote_op(doc, out)
        elif kind in ("peer_joined", PEER_ANNOUNCE, "peer_left", PEER_QUERY):
            self.cluster.remote_peer(doc, kind, out)
        elif kind == "cursor":
            self.cluster.remote_cursor(doc, out.obj)
        elif kind == SUBMIT:
            self.cluster.service.leadership.submitted(doc, out.obj)
        elif kind == REPLY:
            self.cluster.service.leadership.reply_arrived(doc, out.obj)
        elif kind == LEADER_GONE:
            self.cluster.service.leadership.leader_gone(doc)


class ClusterSync:
    """Keeps this node's copies of the open documents in step with the other
    nodes' (cluster mode): their ops, their peers, and a rebase when this node
    lost the race to append.  Part of an :class:`EditingService`; idle on one node."""

    def __init__(self, service: EditingService) -> None:
        self.service = service
        self.peer_ttl = 15.0  # a node's peers are forgotten this long after it last announced them
        self.feeds: dict[str, DocFeed] = {}
        self._beat: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._beat = asyncio.ensure_future(self._announce_peers())

    def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()

    async def follow(self, doc_id: str) -> None:
        """Subscribe to the ops other nodes commit to ``doc_id``, before its log is read."""
        if doc_id in self.feeds:
            return
        # Subscribed before reading the log: an op another node appends
        # meanwhile arrives here (or shows as a gap, filled from the log).
        feed = self.feeds[doc_id] = DocFeed(self, doc_id)
        try:
            await self.service.hub.subscribe(_doc_topic(doc_id), feed)
        except BaseException:
            self.drop_feed(doc_id)
            raise ProtocolError("unavailable", "the document could not be opened; retry shortly",
                                close=Close.TRY_AGAIN) from None

    def query_peers(self, doc: LiveDoc) -> None:
        """Ask the other nodes who edits ``doc`` there (just loaded here)."""
        self.service.hub.send_others(doc.topic, Outgoing({"type": PEER_QUERY}))

    async def _announce_peers(self) -> None:
        """Every ``peer_ttl / 3``: tell the other nodes who edits here, and
        forget (with a ``peer_left``) the peers of a node that went quiet."""
        svc = self.service
        while True:
            await asyncio.sleep(self.peer_ttl / 3)
            now = svc.clock()
            for doc in list(svc.docs.values()):
                self._announce(doc)
                for client, (info, heard) in list(doc.remote_peers.items()):
                    if now - heard > self.peer_ttl:
                        del doc.remote_peers[client]
                        doc.remote_cursors.pop(client, None)
                        self._publish_local(doc, {"type": "peer_left", "client": client, "user": info["user"]})

    def resync(self) -> None:
        """The backplane was cut off and is back: what other nodes committed
        meanwhile may not have arrived; every open document reads the log."""
        for doc in list(self.service.docs.values()):
            if not doc.broken:
                if doc.writing:
                    doc.conflict = True
                else:
                    self.start_rebase(doc)
                self.service.leadership.resend(doc, everything=True)  # the leader may not have had them

    def remote_peer(self, doc: LiveDoc, kind: str | None, out: Outgoing) -> None:
        svc = self.service
        obj = out.obj
        client = obj.get("client")
        if kind == PEER_QUERY:
            self._announce(doc)
            return
        if not isinstance(client, str) or client in doc.peers:
            return  # our own peer (a local publish comes back here too)
        if kind == "peer_left":
            doc.remote_peers.pop(client, None)
            doc.remote_cursors.pop(client, None)
            return
        info = {k: obj[k] for k in ("client", "user", "color") if k in obj}
        new = client not in doc.remote_peers
        doc.remote_peers[client] = (info, svc.clock())
        cursor = _as_cursor(obj.get("cursor"))
        if kind == PEER_ANNOUNCE and new:
            # A peer we had not heard of (we loaded the document after it joined): tell ours,
            # with its selection if it has one.
            self._publish_local(doc, {"type": "peer_joined", **info})
            if cursor is not None and client not in doc.remote_cursors:
                doc.remote_cursors[client] = cursor
                svc.send_remote_cursor(doc, info)

    def _announce(self, doc: LiveDoc) -> None:
        """Tell the other nodes who edits ``doc`` here, and where each one's selection is."""
        for peer in doc.announced():
            obj: dict[str, Any] = {"type": PEER_ANNOUNCE, **peer.info()}
            if peer.cursor is not None:
                obj["cursor"] = list(peer.cursor)
            self.service.hub.send_others(doc.topic, Outgoing(obj))

    def remote_cursor(self, doc: LiveDoc, obj: dict[str, Any]) -> None:
        """Another node's peer moved its selection: kept for the snapshots of peers who join here later."""
        client = obj.get("client")
        if isinstance(client, str) and client not in doc.peers:
            cursor = _as_cursor([obj.get("rev"), obj.get("anchor"), obj.get("head")])
            if cursor is not None:
                doc.remote_cursors[client] = cursor

    def _publish_local(self, doc: LiveDoc, obj: dict[str, Any]) -> None:
        out = Outgoing(obj, client=obj.get("client"))
        for topic in (doc.topic, doc.topic16):
            self.service.hub.dispatch(topic, out)

    def remote_op(self, doc: LiveDoc, out: Outgoing) -> None:
        """An op another node committed.  Applied at once when it is the next
        revision and this node has nothing of its own in flight; otherwise (a
        gap, or our own ops now lose the race) the document rebases."""
        svc = self.service
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
                self.start_rebase(doc)  # not what our copy expects: read the log
                return
            doc.committed_rev = rev
            doc.committed_text = state.text
            doc.updated = now_ms()
            svc.remote_ops += 1
            svc._deliver_op(doc, out, op16)
            svc.leadership.ack_forwarded(doc, rev, obj.get("client"), obj.get("seq"))
            doc.run_waiters(rev)
            return
        doc.conflict = True
        if not doc.writing:
            self.start_rebase(doc)

    def start_rebase(self, doc: LiveDoc) -> None:
        if doc.rebasing or doc.broken:
            doc.conflict = True
            return
        if doc.flush_handle is not None:
            doc.flush_handle.cancel()
            doc.flush_handle = None
        doc.rebasing = True
        doc.conflict = False
        self.service._background_task(self._rebase(doc))


    async def _rebase(self, doc: LiveDoc) -> None:
        """Catch up with the log other nodes appended to, the way a client
        catches up with the server: read the ops after our last committed
        revision, hand them to our peers, transform our own not yet committed
        ops over them (ours arrived later, so ours go first on a tie, as on one
        node), and append those again.  Usually only the tail of the log is
        read; a full reload when the log no longer reaches back that far."""
        svc = self.service
        base = doc.committed_rev
        try:
            tail = await svc.log.ops_since(doc.id, base)
            if doc.broken:
                return
            pending = list(doc.inflight) + doc.batch
            if tail is not None:
                state = doc.state
                remote, owners = replay_tail(state, base, doc.committed_text, tail)
            else:
                loaded = await svc.log.load(doc.id, create=False, max_docs=0, keep=svc.log_keep)
                if loaded is None:
                    raise SnapshotError(f"document {doc.id} is gone from the store")
                state, _snap_rev, owners = build_state(doc.id, loaded, **svc._state_limits())
                remote = ops_after(doc.id, state, base)
                pending = list(doc.inflight) + doc.batch
            committed_text = state.text
            rebased, refused = resubmit(state, pending)
        except Exception as exc:  # a broken log, an unreachable store: the single-node path
            doc.rebasing = False
            svc._fail(doc, exc)
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
                svc._deliver_op(doc, out, op16)
            svc.leadership.ack_forwarded(doc, rev, client, seq)
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
        svc.rebases += 1
        svc.remote_ops += len(remote)
        doc.rebasing = False
        doc.run_waiters(doc.committed_rev)
        for p, why in refused:
            # Never acknowledged, and no longer mergeable: only its sender reconnects
            # (and reloads), not every peer of the document.
            log.warning("document %s: an edit of %s could not be merged after a rebase (%s)", doc.id, p.client,
                        why.message)
            if p.peer is not None and not p.peer.gone:
                peer = p.peer
                svc.leave(peer)
                peer.member.close(Close.TRY_AGAIN, "your last edit could not be merged; reload")
            elif p.peer is None and p.client is not None:  # a follower's: it closes its peer
                svc.leadership.reply(doc, p.client, p.seq, "your last edit could not be merged; reload", close=True)
        deferred, doc.deferred = doc.deferred, []
        for later in deferred:  # admitted when they arrived (edit_rate spent): not checked twice
            later()
        if doc.batch:
            # Append now, even if more arrived meanwhile: a losing append claims
            # the next turn in the log, while rebasing again first could go on
            # for as long as the other node keeps appending.
            svc._schedule_flush(doc)
        elif doc.conflict:
            self.start_rebase(doc)


    def drop_feed(self, doc_id: str) -> None:
        feed = self.feeds.pop(doc_id, None)
        if feed is not None:
            self.service.hub.unsubscribe(_doc_topic(doc_id), feed)


def _doc_topic(doc_id: str) -> str:
    return "doc:" + doc_id


def _as_cursor(value: Any) -> tuple[int, int, int] | None:
    """``(rev, anchor, head)`` from ``[rev, anchor, head]`` as another node
    sent it, or None unless it is three non-negative ints."""
    if (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        return value[0], value[1], value[2]
    return None
