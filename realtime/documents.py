"""One collaboratively edited document: text, revision, op log, dedupe (sans-I/O).

:class:`DocumentState` is the server's authority for one document.  It does no
I/O: the handler and storage call :meth:`DocumentState.submit` (or
:meth:`~DocumentState.prepare` + :meth:`~DocumentState.apply_entry` where an
atomic append in a shared store decides the order), then persist, ack and fan
out what it returns.

Revisions: ``rev`` is the number of ops applied so far (a new document is at
rev 0).  The op that took the document from ``r - 1`` to ``r`` is logged as
``LogEntry(rev=r, ...)``.  A client's op is based on the rev it has seen; the
server transforms it over every logged op after that rev (see the tie-break in
:mod:`realtime.ot`: ``transform(incoming, logged)``, so on a tie the incoming
op's insert goes first, as in ot.js and ShareDB), applies it and logs it.

Only the last ``max_log`` entries stay in memory: an op based on an older rev
is refused with ``conflict`` and that client must reload the document.

Units: the state counts code points.  A client may count UTF-16 code units
instead (``units="utf16"``, see :mod:`realtime.units`): each logged op is also
kept counted in UTF-16 units (converted against the text it applied to, the
one moment that text is at hand), an incoming UTF-16 op is transformed over
those and converted to code points against the current text.  Saved
snapshots carry the UTF-16 forms that differ, so they survive a reload.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, NamedTuple

from realtime import ot
from realtime.ot import Op, OTError
from realtime.protocol import ProtocolError
from realtime.units import CODEPOINT, UNITS, UTF16, TextUnits, inserted, same_shape, utf16_length

__all__ = [
    "SNAPSHOT_FORMAT",
    "DocumentState",
    "LogEntry",
    "SnapshotError",
    "SubmitResult",
    "valid_doc_id",
]

SNAPSHOT_FORMAT = 1

_DOC_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def valid_doc_id(s: object) -> bool:
    """True if ``s`` is a document id: 1 to 64 characters, each an ASCII letter,
    digit, ``_`` or ``-``.

    The rule keeps ids safe in URLs, file names, SQL and Redis keys without
    escaping.
    """
    return type(s) is str and _DOC_ID.fullmatch(s) is not None


class SnapshotError(ValueError):
    """A saved snapshot that cannot be loaded (unknown format or inconsistent data)."""


class LogEntry(NamedTuple):
    """One applied op: ``rev`` is the revision it produced.  Treat ``op`` as read-only."""

    rev: int
    op: Op
    client_id: str | None
    seq: int | None


@dataclass(frozen=True)
class SubmitResult:
    """What :meth:`DocumentState.submit` did.

    ``rev``: the revision the op produced (for a duplicate: the one it produced
    the first time).  ``op``: the op as applied, transformed, in normal form --
    send it to the other clients; for a duplicate, the logged op when still in
    the window, else ``None``.  ``duplicate``: the op was applied before and
    nothing changed now; ack it again, do not fan it out.  ``op16``: ``op``
    counted in UTF-16 code units, for the clients that use them (``None`` for
    a duplicate).
    """

    rev: int
    op: Op | None
    duplicate: bool = False
    op16: Op | None = field(default=None, compare=False)


class DocumentState:
    """The authoritative text, revision and recent op log of one document.

    Invariants: ``len(log) <= max_log``; the log holds the ops for revisions
    ``log_start + 1 .. rev`` contiguously; any :class:`~realtime.protocol.ProtocolError` leaves
    the state exactly as it was.

    Limits (code points): ``max_op_size`` caps the text one op inserts,
    ``max_doc_size`` the document an op may leave behind (an op that shrinks
    an already oversized document is still allowed).  ``max_clients`` caps the
    dedupe table (least recently used client ids are forgotten first).
    """

    def __init__(
        self,
        doc_id: str,
        text: str = "",
        rev: int = 0,
        *,
        max_log: int = 1000,
        max_op_size: int = 64 * 1024,
        max_doc_size: int = 1_000_000,
        max_clients: int = 10_000,
    ) -> None:
        if not valid_doc_id(doc_id):
            raise ValueError(f"invalid document id {doc_id!r}")
        if type(text) is not str or not _well_formed(text):
            raise ValueError("document text must be a str without lone surrogates")
        if type(rev) is not int or rev < 0:
            raise ValueError(f"invalid revision {rev!r}")
        if max_log < 0 or max_op_size < 0 or max_doc_size < 0 or max_clients < 1:
            raise ValueError("limits must not be negative")
        self._doc_id = doc_id
        self._text = text
        self._rev = rev
        self.max_log = max_log
        self.max_op_size = max_op_size
        self.max_doc_size = max_doc_size
        self.max_clients = max_clients
        self._log: deque[LogEntry] = deque(maxlen=max_log)
        # Each logged op counted in UTF-16 units, None where unknown (before a reload).
        self._log16: deque[Op | None] = deque(maxlen=max_log)
        self._len16 = utf16_length(text)
        self._units: TextUnits | None = None  # of the current text, built when needed
        # client_id -> (last seq applied, rev it produced); insertion order is LRU order.
        self._clients: OrderedDict[str, tuple[int, int]] = OrderedDict()

    # -- read-only views ------------------------------------------------------

    @property
    def doc_id(self) -> str:
        return self._doc_id

    @property
    def rev(self) -> int:
        """Number of ops applied so far."""
        return self._rev

    @property
    def text(self) -> str:
        return self._text

    @property
    def length16(self) -> int:
        """Length of the text in UTF-16 code units."""
        return self._len16

    def text_units(self) -> TextUnits:
        """Position conversions for the current text (built once per revision)."""
        units = self._units
        if units is None or units.text is not self._text:
            units = self._units = TextUnits(self._text, self._len16)
        return units

    @property
    def log(self) -> list[LogEntry]:
        """A copy of the kept log window, oldest first."""
        return list(self._log)

    @property
    def log_start(self) -> int:
        """The oldest revision ops can be based on (or read from with :meth:`ops_since`)."""
        return self._rev - len(self._log)

    def __repr__(self) -> str:
        return (
            f"DocumentState({self._doc_id!r}, rev={self._rev}, "
            f"len={len(self._text)}, log={len(self._log)})"
        )

    # -- submitting -------------------------------------------------------------

    def prepare(
        self,
        base_rev: int,
        op: object,
        client_id: str | None = None,
        seq: int | None = None,
        *,
        units: str = CODEPOINT,
    ) -> SubmitResult:
        """Work out what :meth:`submit` would do, without changing anything.

        Returns the :class:`SubmitResult` that :meth:`submit` would (``rev`` is
        the revision the op would get) or raises the same
        :class:`~realtime.protocol.ProtocolError`.  In cluster mode: prepare, append at
        ``result.rev`` atomically in the shared log, then :meth:`apply_entry`;
        if the append lost a race, apply the winners and prepare again.
        """
        if type(base_rev) is not int or base_rev < 0:
            raise ProtocolError("bad_message", "rev must be a non-negative integer")
        _check_client(client_id, seq)
        try:
            op = ot.check(op)
        except OTError as exc:
            raise ProtocolError("bad_message", str(exc)) from None

        if client_id is not None and seq is not None:
            seen = self._clients.get(client_id)
            if seen is not None and seq <= seen[0]:
                # A client sends seq n+1 only once n is acknowledged, so a seq up to
                # its last one was applied already (e.g. a late resend from a dead
                # connection arriving after newer ops).
                rev = seen[1] if seq == seen[0] else self._find_rev(client_id, seq)
                if rev is None:
                    raise ProtocolError(
                        "conflict",
                        f"seq {seq} is older than this client's last ({seen[0]}) "
                        "and no longer in the log",
                    )
                return SubmitResult(rev, self._logged_op(rev), duplicate=True)

        if base_rev > self._rev:
            raise ProtocolError(
                "conflict", f"rev {base_rev} is newer than the document (rev {self._rev})"
            )
        start = self.log_start
        if base_rev < start:
            raise ProtocolError(
                "conflict",
                f"rev {base_rev} is too old to merge (oldest kept: {start}); reload the document",
            )

        if units == UTF16:
            return self._prepare16(base_rev, op, start)
        if units != CODEPOINT:
            raise ValueError(f"units must be one of {UNITS}")
        size = inserted(op)
        if size > self.max_op_size:
            raise ProtocolError(
                "too_large",
                f"the edit inserts {size} characters; the limit is {self.max_op_size}",
            )

        try:
            for entry in islice(self._log, base_rev - start, None):
                op = ot.transform(op, entry.op)[0]  # the incoming op first on a tie
            size, new_size = ot.lengths(op)
        except OTError as exc:
            raise ProtocolError("bad_message", f"the edit does not fit rev {base_rev}: {exc}") from None
        if size != len(self._text):
            # Only reachable with base_rev == rev: transform already checks lengths.
            raise ProtocolError(
                "bad_message",
                f"the edit is for a document of {size} characters, but rev {base_rev} "
                f"has {len(self._text)}",
            )
        if new_size > self.max_doc_size and new_size > len(self._text):
            raise ProtocolError(
                "too_large",
                f"the document would have {new_size} characters; the limit is {self.max_doc_size}",
            )
        return SubmitResult(self._rev + 1, op, op16=self.text_units().op_to_utf16(op))

    def _prepare16(self, base_rev: int, op16: Op, start: int) -> SubmitResult:
        """:meth:`prepare` for an op counted in UTF-16 code units; sizes in those units too."""
        size = inserted(op16, utf16_length)
        if size > self.max_op_size:
            raise ProtocolError(
                "too_large",
                f"the edit inserts {size} UTF-16 code units; the limit is {self.max_op_size}",
            )
        logged = self._ops16_since(base_rev)
        if logged is None:
            raise ProtocolError(
                "conflict",
                f"rev {base_rev} is too old to merge in UTF-16 units (the document was reloaded "
                "since); reload the document",
            )
        base = ot.lengths(op16)[0]
        expected = ot.lengths(logged[0])[0] if logged else self._len16
        if base != expected:
            raise ProtocolError(
                "bad_message",
                f"the edit is for a document of {base} UTF-16 code units, but rev {base_rev} has {expected}",
            )
        for other in logged:
            op16 = ot.transform(op16, other, utf16_length)[0]  # the incoming op first on a tie
        try:
            op = self.text_units().op_from_utf16(op16)
        except OTError as exc:  # SplitError: lengths were checked above
            raise ProtocolError("bad_message", str(exc)) from None
        new_size = ot.lengths(op16, utf16_length)[1]
        if new_size > self.max_doc_size and new_size > self._len16:
            raise ProtocolError(
                "too_large",
                f"the document would have {new_size} UTF-16 code units; the limit is {self.max_doc_size}",
            )
        return SubmitResult(self._rev + 1, op, op16=op16)

    def submit(
        self,
        base_rev: int,
        op: object,
        client_id: str | None = None,
        seq: int | None = None,
        *,
        units: str = CODEPOINT,
    ) -> SubmitResult:
        """Apply a client's ``op``, based on revision ``base_rev``.

        Validates ``op`` (untrusted), transforms it over every logged op after
        ``base_rev``, applies it, logs it and bumps ``rev``.

        Dedupe: with ``client_id`` and ``seq`` (a non-negative int), a resent op
        is recognised and not applied again: ``duplicate=True`` with its
        original ``rev``, nothing changes.  This relies on the client protocol
        (``OTClient``): one op in flight per client, seq increasing by one
        after each ack -- so any seq up to the client's last applied one is a
        resend.  If such an old op has left the log window its rev is unknown:
        ``conflict``.  So ``client_id`` names one ``OTClient`` (random per page
        load or connection-independent session), never a user: a reloaded page
        that reused an id would restart at seq 1 and be ignored.

        ``units``: what ``op`` counts, ``"codepoint"`` or ``"utf16"``; size
        limits count the same units.  A UTF-16 op that would split a
        surrogate pair is ``bad_message``; one based on a revision whose
        UTF-16 form is unknown (logged before the document was reloaded from
        a snapshot without it) is ``conflict``.

        Raises :class:`~realtime.protocol.ProtocolError`; on error nothing changes.
        """
        result = self.prepare(base_rev, op, client_id, seq, units=units)
        if not result.duplicate:
            assert result.op is not None and result.op16 is not None
            self._append(result.op, result.op16, ot.apply(self._text, result.op), client_id, seq)
        return result

    def apply_entry(
        self, rev: int, op: object, client_id: str | None = None, seq: int | None = None
    ) -> None:
        """Apply an op whose place in the order is already decided.

        For replaying a stored log onto a snapshot, and for ops another node
        appended to a shared log.  ``rev`` must be ``self.rev + 1`` and ``op``
        must fit the current text; no transform, no size limits (refusing an
        op that is already in the log would split the copies).  Raises
        :class:`~realtime.protocol.ProtocolError` (``conflict`` for a gap, ``bad_message`` for a
        bad op); on error nothing changes.
        """
        if rev != self._rev + 1:
            raise ProtocolError(
                "conflict", f"entry for rev {rev} does not follow rev {self._rev}"
            )
        _check_client(client_id, seq)
        try:
            op = ot.check(op)
            op16 = self.text_units().op_to_utf16(op)
            text = ot.apply(self._text, op)
        except OTError as exc:
            raise ProtocolError("bad_message", str(exc)) from None
        self._append(op, op16, text, client_id, seq)

    def _append(self, op: Op, op16: Op, text: str, client_id: str | None, seq: int | None) -> None:
        self._text = text
        self._len16 = ot.lengths(op16, utf16_length)[1]
        self._rev += 1
        self._log.append(LogEntry(self._rev, op, client_id, seq))
        self._log16.append(op16)
        if client_id is not None and seq is not None:
            self._clients[client_id] = (seq, self._rev)
            self._clients.move_to_end(client_id)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)

    def rollback(self, rev: int, text: str) -> list[LogEntry]:
        """Undo the ops after ``rev`` (``text`` is the text at ``rev``), as when
        another node appended first and ours must be transformed over its ops.
        Returns the entries taken off.  Raises :class:`~realtime.protocol.ProtocolError`
        (``conflict``) when the log no longer holds them."""
        k = self._rev - rev
        if k < 0 or k > len(self._log):
            raise ProtocolError("conflict", f"cannot roll back from rev {self._rev} to {rev}")
        undone = [self._log.pop() for _ in range(k)][::-1]
        for _ in range(k):
            self._log16.pop()
        self._rev = rev
        self._text = text
        self._len16 = utf16_length(text)
        self._units = None
        for entry in undone:
            if entry.client_id is None:
                continue
            # The client's previous op, if the log still has it (else its rev is unknown: resends are conflicts).
            prev = next((e for e in reversed(self._log) if e.client_id == entry.client_id), None)
            if prev is not None and prev.seq is not None:
                self._clients[entry.client_id] = (prev.seq, prev.rev)
            elif entry.seq is not None:
                self._clients[entry.client_id] = (entry.seq - 1, -1)
        return undone

    def seen(self, client_id: str, seq: int) -> bool:
        """Whether this client's op ``seq`` (or a later one) is already applied."""
        last = self._clients.get(client_id)
        return last is not None and seq <= last[0]

    def _find_rev(self, client_id: str, seq: int) -> int | None:
        for entry in reversed(self._log):
            if entry.seq == seq and entry.client_id == client_id:
                return entry.rev
        return None

    def _logged_op(self, rev: int) -> Op | None:
        index = rev - self.log_start - 1
        if 0 <= index < len(self._log):
            return self._log[index].op
        return None

    # -- reading ----------------------------------------------------------------

    def ops_since(self, rev: int, units: str = CODEPOINT) -> list[LogEntry] | None:
        """The entries after revision ``rev``, oldest first (``[]`` when up to date).

        With ``units="utf16"`` their ops count UTF-16 code units.  ``None``
        when the log cannot answer -- ``rev`` is older than :attr:`log_start`
        or newer than :attr:`rev`, or an op's UTF-16 form is unknown -- and the
        client needs the whole text instead.
        """
        if type(rev) is not int or not self.log_start <= rev <= self._rev:
            return None
        entries = list(islice(self._log, rev - self.log_start, None))
        if units == UTF16 and entries:
            ops16 = self._ops16_since(rev)
            if ops16 is None:
                return None
            return [e._replace(op=o) for e, o in zip(entries, ops16)]
        return entries

    def _ops16_since(self, rev: int) -> list[Op] | None:
        """The UTF-16 forms of the ops after ``rev`` (in the window), None if one is unknown."""
        out: list[Op] = []
        for op16 in islice(self._log16, rev - self.log_start, None):
            if op16 is None:
                return None
            out.append(op16)
        return out

    def transform_cursor(self, rev: int, index: int) -> int | None:
        """Move a cursor position at revision ``rev`` to the current revision.

        ``None`` when ``rev`` is outside the log window (see :meth:`ops_since`).
        Text inserted exactly at the cursor goes after it.  Raises
        ``ProtocolError("bad_message")`` if ``index`` is not a position in the
        text at ``rev``.
        """
        entries = self.ops_since(rev)
        if entries is None:
            return None
        if type(index) is not int or index < 0:
            raise ProtocolError("bad_message", "a cursor position must be a non-negative integer")
        try:
            if not entries and index > len(self._text):
                raise OTError(
                    f"cursor position {index} is outside a document of {len(self._text)} characters"
                )
            for entry in entries:
                index = ot.transform_index(index, entry.op)
        except OTError as exc:
            raise ProtocolError("bad_message", str(exc)) from None
        return index

    # -- saving -------------------------------------------------------------------

    def to_snapshot(self, *, include_log: bool = True) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_snapshot` turns back into this state.

        ``{"format": 1, "doc_id", "rev", "text", "clients": {id: [seq, rev]},
        "log": [[rev, op, client_id, seq], ...], "utf16": {"from": rev, "ops":
        [[rev, op16], ...]}}``; without the log, ops based on revisions before
        ``rev`` are refused after a reload.  ``utf16`` is there with or
        without the log (the log may be stored elsewhere): the logged ops after
        revision ``from`` are known in UTF-16 units, as listed, or the same as
        in code points where not listed.
        """
        known = 0  # the newest entries whose UTF-16 form is known
        listed: list[list[Any]] = []  # [rev, op16] of those where it differs
        for entry, op16 in zip(reversed(self._log), reversed(self._log16)):
            if op16 is None:
                break
            known += 1
            if op16 is not entry.op and op16 != entry.op:
                listed.append([entry.rev, list(op16)])
        utf16 = {"from": self._rev - known, "ops": listed[::-1]}
        return {
            "format": SNAPSHOT_FORMAT,
            "doc_id": self._doc_id,
            "rev": self._rev,
            "text": self._text,
            "clients": {cid: [seq, rev] for cid, (seq, rev) in self._clients.items()},
            "log": [[e.rev, list(e.op), e.client_id, e.seq] for e in self._log]
            if include_log
            else [],
            "utf16": utf16,
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any], **limits: int) -> DocumentState:
        """Rebuild a state saved by :meth:`to_snapshot`; ``limits`` as for the constructor.

        Missing ``clients`` and ``log`` (older saves) default to empty.  Raises
        :class:`SnapshotError` for an unknown format or inconsistent data.
        """
        if not isinstance(data, dict):
            raise SnapshotError("a snapshot must be a dict")
        if data.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"unsupported snapshot format {data.get('format')!r}")
        try:
            state = cls(data.get("doc_id"), data.get("text"), data.get("rev"), **limits)  # type: ignore[arg-type]
        except ValueError as exc:
            raise SnapshotError(str(exc)) from None

        log = data.get("log")
        if log is None:
            log = []
        if not isinstance(log, list):
            raise SnapshotError("snapshot log must be a list")
        if len(log) > state._rev:
            raise SnapshotError("snapshot log is longer than its revision")
        # Walk back from the text: each op must produce what the next one expects.
        expected_target = len(state._text)
        entries: list[LogEntry] = []
        for raw in reversed(log[len(log) - state.max_log :] if state.max_log else []):
            rev = state._rev - len(entries)
            if not isinstance(raw, (list, tuple)) or len(raw) != 4:
                raise SnapshotError("a snapshot log entry must be [rev, op, client_id, seq]")
            if type(raw[0]) is not int or raw[0] != rev:
                raise SnapshotError("snapshot log revisions are not contiguous up to rev")
            try:
                _check_client(raw[2], raw[3])
                op = ot.check(raw[1])
            except (ProtocolError, OTError) as exc:
                raise SnapshotError(f"bad snapshot log entry for rev {rev}: {exc}") from None
            base, target = ot.lengths(op)
            if target != expected_target:
                raise SnapshotError(f"snapshot log entry for rev {rev} does not fit the text")
            expected_target = base
            entries.append(LogEntry(rev, op, raw[2], raw[3]))
        state._log.extend(reversed(entries))
        state._log16.extend(_snapshot_ops16(data.get("utf16"), entries[::-1], state._len16))

        clients = data.get("clients")
        if clients is None:
            clients = {}
        if not isinstance(clients, dict):
            raise SnapshotError("snapshot clients must be a dict")
        for client_id, pair in clients.items():
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(type(x) is int for x in pair)
            ):
                raise SnapshotError(f"bad snapshot dedupe entry for client {client_id!r}")
            try:
                _check_client(client_id, pair[0])
            except ProtocolError as exc:
                raise SnapshotError(f"bad snapshot dedupe entry: {exc}") from None
            state._clients[client_id] = (pair[0], pair[1])
        while len(state._clients) > state.max_clients:
            state._clients.popitem(last=False)
        return state


def _snapshot_ops16(saved: object, entries: list[LogEntry], length16: int) -> list[Op | None]:
    """The UTF-16 forms of ``entries`` (oldest first) that a snapshot's ``utf16`` records.

    Missing (an older snapshot): all unknown.  Raises :class:`SnapshotError`
    for data that does not fit the entries.
    """
    if saved is None:
        return [None] * len(entries)
    if not isinstance(saved, dict) or type(saved.get("from")) is not int or not isinstance(saved.get("ops"), list):
        raise SnapshotError("snapshot utf16 must be {'from': rev, 'ops': [[rev, op], ...]}")
    listed: dict[int, Op] = {}
    for item in saved["ops"]:
        if not isinstance(item, list) or len(item) != 2 or type(item[0]) is not int:
            raise SnapshotError("a snapshot utf16 entry must be [rev, op]")
        try:
            listed[item[0]] = ot.check(item[1])
        except OTError as exc:
            raise SnapshotError(f"bad snapshot utf16 entry for rev {item[0]}: {exc}") from None
    out: list[Op | None] = []
    expected = length16  # walk back from the text, as for the log
    for entry in reversed(entries):
        if entry.rev <= saved["from"]:
            out.extend([None] * (len(entries) - len(out)))
            break
        op16 = listed.get(entry.rev, entry.op)
        base, target = ot.lengths(op16, utf16_length)
        if not same_shape(entry.op, op16) or target != expected:
            raise SnapshotError(f"snapshot utf16 entry for rev {entry.rev} does not fit the log")
        expected = base
        out.append(op16)
    out.reverse()
    return out


def _well_formed(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_client(client_id: object, seq: object) -> None:
    if client_id is not None and (type(client_id) is not str or not client_id):
        raise ProtocolError("bad_message", "client id must be a non-empty string")
    if seq is not None and (type(seq) is not int or seq < 0):
        raise ProtocolError("bad_message", "seq must be a non-negative integer")
