"""A leader per document (cluster mode).

Each open document has a leader: the node holding its lease in the store
(``rt:lease:doc:<id>`` in Redis, renewed every ``leader_ttl / 3``), normally
the first node that opened it.  The leader applies, appends and broadcasts
every op exactly as a single node does.  The other nodes (followers) send
their peers' ops to it over the hub (``submit``) and acknowledge each one when
its broadcast comes back, in rev order; the leader answers directly
(``reply``) only what is not a broadcast: an error, the ack of a resend, or
"reload".  So two nodes do not race for the log's next revision.

Changing hands: a leader that unloads a document, breaks, or stops gives up
the lease and says so (``leader_gone``): a follower takes it at once.  One that
dies is replaced ``leader_ttl`` after its last renewal.  A follower sends again
what the leader has not answered within :data:`FORWARD_RESEND` (the same
``(client, seq)``, so it is applied at most once), and when it becomes the
leader itself it applies what is still unanswered, after catching up with the
log.  Underneath, every append is still a compare-and-append: two nodes that
both lead for a moment still leave one log, and the loser rebases
(:mod:`realtime.editing.cluster`).

Clients never see any of this: the messages above travel between nodes on the
document's topic and peers ignore them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from realtime.editing.live import LEADER_GONE, REPLY, SUBMIT, Forwarded, LiveDoc, Peer, Pending, valid_client_id
from realtime.protocol import Close, Outgoing, ProtocolError
from realtime.storage.base import Lease
from realtime.units import CODEPOINT, UNITS

if TYPE_CHECKING:
    from realtime.editing.service import EditingService

log = logging.getLogger("realtime.editing")

FORWARD_RESEND = 1.0  # seconds: an op the leader has not answered is sent again (same seq)


class Leadership:
    """Who orders each open document's ops, and the forwarding to it.  Part of
    an :class:`EditingService`; off (every document led here) on one node or
    without leases, where every node appends and races (``leader_ttl`` 0)."""

    def __init__(self, service: EditingService, lease: Callable[[str, float], Lease] | None, ttl: float) -> None:
        self.service = service
        self.lease = lease
        self.ttl = ttl
        self._renewing: asyncio.Future[None] | None = None
        # counters for /metrics
        self.forwarded_ops = 0  # sent to a document's leader on another node
        self.ops_for_others = 0  # forwarded to us as the leader, applied here
        self.leader_changes = 0  # documents this node took the lead of

    @property
    def enabled(self) -> bool:
        return self.lease is not None

    def start(self) -> None:
        if self.lease is not None:
            self._renewing = asyncio.ensure_future(self._renew_leases())

    def stop(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()

    # -- the lease -----------------------------------------------------------------

    async def claim(self, doc: LiveDoc) -> None:
        """Take ``doc``'s lease if nobody holds it (just loaded here, not yet live)."""
        if self.lease is None:
            return
        doc.lease = self.lease("doc:" + doc.id, self.ttl)
        doc.leader = await doc.lease.renew()
        if doc.leader:
            self.leader_changes += 1

    async def _renew_leases(self) -> None:
        """Every ``ttl / 3``: keep the leases of the documents this node leads,
        and try to take those whose leader stopped renewing."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            docs = [d for d in self.service.docs.values() if d.lease is not None and not d.broken]
            held = await asyncio.gather(*(d.lease.renew() for d in docs if d.lease is not None))
            for doc, h in zip(docs, held):
                self._lead(doc, h)

    async def _renew_now(self, doc: LiveDoc) -> None:
        lease = doc.lease
        if lease is not None:
            self._lead(doc, await lease.renew())

    def leader_gone(self, doc: LiveDoc) -> None:
        """The leader let go (it unloaded the document, or is stopping): take over now."""
        if doc.lease is not None and not doc.leader and not doc.broken:
            self.service._background_task(self._renew_now(doc))

    def _lead(self, doc: LiveDoc, held: bool) -> None:
        svc = self.service
        if svc.docs.get(doc.id) is not doc or doc.broken:
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
                    doc.deferred.append(partial(svc._apply_later, fwd.peer, fwd.base_rev, fwd.op, fwd.seq))
            self.forget(doc)
            svc.cluster.start_rebase(doc)
        elif not held and doc.leader and doc.idle_writer:
            doc.leader = False  # another node holds the lease: forward from now on

    def let_go(self, doc: LiveDoc) -> None:
        """Give up ``doc``'s lease (unloaded, broken, or this node stops) and say so."""
        lease, doc.lease = doc.lease, None
        if lease is not None and lease.held:
            self.service._background_task(self._release(doc, lease))

    async def _release(self, doc: LiveDoc, lease: Lease) -> None:
        await lease.stop()
        self.service.hub.send_others(doc.topic, Outgoing({"type": LEADER_GONE}))

    # -- a follower: forwarding ----------------------------------------------------

    def forward(self, doc: LiveDoc, peer: Peer, base_rev: Any, op: Any, seq: Any) -> None:
        """Send ``peer``'s op (admitted here: rights, rate) to the document's leader."""
        fwd = Forwarded(peer, base_rev, op, seq, self.service.clock())
        doc.forwarded.setdefault(peer.client_id, deque()).append(fwd)
        self.forwarded_ops += 1
        self._send_submit(doc, fwd)
        self._resend_later(doc)

    def _send_submit(self, doc: LiveDoc, fwd: Forwarded) -> None:
        peer = fwd.peer
        obj = {"type": SUBMIT, "rev": fwd.base_rev, "op": fwd.op, "seq": fwd.seq, "client": peer.client_id,
               "user": peer.user.id, "units": peer.units}
        self.service.hub.send_others(doc.topic, Outgoing(obj, client=peer.client_id))

    def _resend_later(self, doc: LiveDoc) -> None:
        if doc.forwarded and doc.resend_handle is None and not doc.broken:
            doc.resend_handle = asyncio.get_running_loop().call_later(FORWARD_RESEND, self._resend_due, doc)

    def _resend_due(self, doc: LiveDoc) -> None:
        doc.resend_handle = None
        if not doc.broken and self.service.docs.get(doc.id) is doc:
            self.resend(doc)

    def resend(self, doc: LiveDoc, everything: bool = False) -> None:
        """Send again the forwarded ops the leader has not answered within
        ``FORWARD_RESEND`` (or all of them, after the backplane was cut off):
        the leader may have changed, or a message may have been lost.  The same
        ``(client, seq)`` is applied at most once; an op without a seq is never
        sent twice."""
        now = self.service.clock()
        for queue in doc.forwarded.values():
            for i, fwd in enumerate(queue):
                if type(fwd.seq) is int and (everything or now - fwd.sent_at >= FORWARD_RESEND):
                    queue[i] = fwd._replace(sent_at=now)
                    self._send_submit(doc, fwd)
        self._resend_later(doc)

    def forget(self, doc: LiveDoc) -> None:
        """Nothing forwarded is waited for any more (this node leads, or the document broke)."""
        doc.forwarded.clear()
        if doc.resend_handle is not None:
            doc.resend_handle.cancel()
            doc.resend_handle = None

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

    def ack_forwarded(self, doc: LiveDoc, rev: int, client: Any, seq: Any) -> None:
        """An op the leader committed (its broadcast, applied here): if it is one
        of our peers', that is its ack."""
        if doc.forwarded:
            peer = self._settle(doc, client, seq)
            if peer is not None:
                peer.member.send({"type": "ack", "rev": rev, "seq": seq})

    def reply_arrived(self, doc: LiveDoc, obj: dict[str, Any]) -> None:
        """The leader's answer to one of our peers' ops that is not its broadcast."""
        peer = self._settle(doc, obj.get("client"), obj.get("seq"))
        if peer is None:
            return  # not ours, or answered already (by the op's broadcast)
        msg = obj.get("msg")
        if obj.get("close"):
            self.service.leave(peer)
            peer.member.close(Close.TRY_AGAIN, str(msg)[:120])
        elif isinstance(msg, dict):
            peer.member.send(msg)

    # -- the leader: ops from the followers -------------------------------------------

    def submitted(self, doc: LiveDoc, obj: dict[str, Any]) -> None:
        """A follower's op: applied here if this node leads the document (else
        ignored: the follower sends it again to whichever node leads)."""
        if not doc.leader or doc.broken or not valid_client_id(obj.get("client")):
            return
        if doc.rebasing:
            doc.deferred.append(partial(self._apply, doc, obj))
        else:
            self._apply(doc, obj)

    def _apply(self, doc: LiveDoc, obj: dict[str, Any]) -> None:
        svc = self.service
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
            svc.ops_refused[exc.code] = svc.ops_refused.get(exc.code, 0) + 1
            err: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
            if type(seq) is int:
                err["seq"] = seq
            self.reply(doc, client, seq, err)
            return
        if result.duplicate:
            svc.ops_duplicate += 1

            def ack_again(exc: BaseException | None, rev: int = result.rev) -> None:
                if exc is None:
                    self.reply(doc, client, seq, {"type": "ack", "rev": rev, "seq": seq, "duplicate": True})

            doc.when_committed(result.rev, ack_again)
            return
        assert result.op is not None and result.op16 is not None
        if user is not None:
            doc.remember_owner(client, user)
        self.ops_for_others += 1
        svc._append(doc, Pending(result.rev, result.op, None, client, seq, user, len(doc.state.text),
                                 result.op16, base_rev, op, units))

    def reply(self, doc: LiveDoc, client: str, seq: Any, msg: Any, close: bool = False) -> None:
        """Answer a follower's op with what is not its broadcast: an error, the
        ack of a resend, or (``close``) "reload" with ``msg`` as the reason."""
        self.service.hub.send_others(doc.topic, Outgoing(
            {"type": REPLY, "client": client, "seq": seq, "msg": msg, "close": close}, client=client))

    # -- metrics -------------------------------------------------------------------

    def metrics(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily("realtime_doc_forwarded_ops", "Edits sent to the document's leader on "
                                  "another node", self.forwarded_ops)
        yield CounterMetricFamily("realtime_doc_ops_for_others", "Edits other nodes forwarded to this node "
                                  "as the document's leader, applied here", self.ops_for_others)
        yield CounterMetricFamily("realtime_doc_leader_changes", "Times this node took the lead of a document",
                                  self.leader_changes)
        yield GaugeMetricFamily("realtime_docs_led", "Open documents this node leads (orders their edits)",
                                sum(1 for d in self.service.docs.values() if d.leader))
