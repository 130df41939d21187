"""Replaying a document's stored log into memory, with no I/O.

:func:`build_state` turns what the store loaded (a snapshot and the ops after
it) into a :class:`~realtime.documents.DocumentState`.  The other three are the
arithmetic of a rebase (cluster mode, :mod:`realtime.editing.cluster`): the
document is rolled back to its last committed revision, the ops other nodes
appended are applied (:func:`replay_tail`, or :func:`ops_after` once the whole
document was reloaded), and this node's ops not yet committed are submitted
again over them (:func:`resubmit`), as their clients sent them.
"""

from __future__ import annotations

from typing import Any

import ujson

from realtime.documents import SNAPSHOT_FORMAT, DocumentState, SnapshotError
from realtime.editing.live import Pending
from realtime.protocol import ProtocolError
from realtime.storage.base import Loaded, StoredOp
from realtime.units import UTF16

RemoteOp = tuple[int, list[Any], list[Any], str | None, int | None]
"""``(rev, op, op in UTF-16 code units, client, seq)``: an op another node committed, for this node's peers."""


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


def replay_tail(state: DocumentState, base: int, committed_text: str,
                tail: list[StoredOp]) -> tuple[list[RemoteOp], dict[str, str]]:
    """Roll ``state`` back to ``base`` (whose text is ``committed_text``), then apply ``tail``.

    ``tail``: the stored ops after ``base``, in order.  Returns them as this
    node's peers get them and the owners (client id -> user id) they name.
    Raises :class:`~realtime.protocol.ProtocolError` or
    :class:`~realtime.ot.OTError` for an op that does not fit (``state`` is
    then half way: the caller drops it).
    """
    state.rollback(base, committed_text)
    remote: list[RemoteOp] = []
    for o in tail:
        op = ujson.loads(o.op)
        op16 = state.text_units().op_to_utf16(op)
        state.apply_entry(o.rev, op, o.client, o.seq)
        remote.append((o.rev, op, op16, o.client, o.seq))
    owners = {o.client: o.user_id for o in tail if o.client and o.user_id}
    return remote, owners


def ops_after(doc_id: str, state: DocumentState, base: int) -> list[RemoteOp]:
    """The ops of ``state``'s log after ``base``, as :func:`replay_tail` returns them
    (for a document reloaded whole).  Raises :class:`~realtime.documents.SnapshotError`
    when the log no longer reaches back to ``base``."""
    entries, entries16 = state.ops_since(base), state.ops_since(base, UTF16)
    if entries is None or entries16 is None:
        raise SnapshotError(f"document {doc_id}: the log no longer reaches rev {base}")
    return [(e.rev, e.op, e16.op, e.client_id, e.seq) for e, e16 in zip(entries, entries16)]


def resubmit(state: DocumentState,
             pending: list[Pending]) -> tuple[list[Pending], list[tuple[Pending, ProtocolError]]]:
    """Submit ``pending`` again over ``state``, each as its client sent it.

    Returns ``(rebased, refused)``: the ops with their new revisions (in
    order), and those that no longer fit (e.g. their base left the log window)
    with why.  An op ``state`` has already seen (it did reach the log; its
    answer was lost) is in neither.
    """
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
    return rebased, refused
