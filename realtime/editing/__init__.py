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
  back (:mod:`realtime.editing.leader`).  Appends are compare-and-append, so
  two nodes that both lead for a moment still leave one log: the loser
  rebases (:mod:`realtime.editing.cluster`).
* **Snapshots** (``format`` 1, :meth:`DocumentState.to_snapshot` without the
  log) are written every ``snapshot_every`` ops and when an idle document is
  unloaded; the op log in the store keeps ``log_keep`` ops before the latest
  revision (for catch-up) and at least every op after the latest snapshot (for
  replay).  Loading = latest snapshot + the ops after it.

The package, by concern:

* :mod:`realtime.editing.live` -- what a node holds of an open document, with
  no I/O: :class:`LiveDoc`, :class:`Peer`, :class:`Pending`, client ids,
  colours, moving cursor positions.
* :mod:`realtime.editing.replay` -- the pure arithmetic of loading (snapshot +
  log) and of a rebase (roll back, apply the other nodes' ops, submit ours
  again).
* :mod:`realtime.editing.cluster` -- several nodes, one log: the document
  feed, remote ops, rebases, the peer query/announce between nodes.
* :mod:`realtime.editing.service` -- :class:`EditingService`: loading and
  evicting, the commit pipeline over the store, peers, cursors, metrics.
"""

from realtime.editing.cluster import ClusterSync, DocFeed
from realtime.editing.live import (
    COLORS,
    DOC_ID_RULE,
    OWNERS_MAX,
    PEER_ANNOUNCE,
    PEER_QUERY,
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
from realtime.editing.replay import build_state, ops_after, replay_tail, resubmit
from realtime.editing.service import EditingService

__all__ = [
    "COLORS", "DOC_ID_RULE", "OWNERS_MAX", "PEER_ANNOUNCE", "PEER_QUERY", "ClusterSync", "DocFeed",
    "EditingService", "LiveDoc", "Member", "Peer", "Pending", "Unavailable", "build_state", "entry_json",
    "move_positions", "new_client_id", "now_ms", "ops_after", "pick_color", "replay_tail", "resubmit",
    "valid_client_id",
]
