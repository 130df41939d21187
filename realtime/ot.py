"""Operational transformation for plain text: the pure core of collaborative editing.

Nothing here does I/O or imports Tornado; ``static/js/ot.js`` is the browser twin
and gives the same answer for the same input (tests/unit/test_ot_js.py checks).

Operations
----------
An operation ("op") is a list of components read left to right against the
document it applies to:

* **retain** -- a positive ``int`` *n*: keep the next *n* characters;
* **delete** -- a negative ``int`` *-n*: remove the next *n* characters;
* **insert** -- a non-empty ``str``: insert this text here.

``bool`` is not an ``int`` here, and nothing else is a component.  Positions and
lengths count Unicode code points (Python ``str`` indexing); the browser
converts from UTF-16.  Inserted text must not contain lone surrogates.

Whole-document rule (no implicit trailing retain)
-------------------------------------------------
An op spans its document exactly: ``apply(text, op)`` requires
``base_length(op) == len(text)``.  The identity op on a document of *n*
characters is therefore ``[n]`` (``[]`` only on the empty document).  The cost
is a few bytes per message; the gain is that a client whose copy has drifted
is caught at its first op (the lengths disagree) instead of silently editing
the wrong place.  ``compose`` and ``transform`` enforce the same rule.

Normal form
-----------
``check``, ``compose`` and ``transform`` return ops in normal form: no zero or
empty components, adjacent components of the same kind merged, an insert
next to a delete placed **before** it (``[-1, "x"]`` becomes ``["x", -1]``),
and the trailing retain kept (the whole-document rule needs it).  Between two
retains there is thus at most one insert followed by at most one delete.
This is ot.js's canonical form (its ``TextOperation`` builder reorders the same
way), and it matters: ``[-1, "x"]`` and ``["x", -1]`` edit the same text but tie
differently against a concurrent insert, so the server's copy of an op must
be in exactly the form its author transforms.  The other functions accept any
valid op, normal or not.

Tie-break
---------
When ``a`` and ``b`` insert at the same position, ``transform(a, b)`` puts
**a's text first**.  The convention of ot.js and ShareDB decides which op is
``a``: the op being submitted.  The server runs ``transform(incoming,
logged)`` and applies the first half; a client runs ``transform(own_pending,
server_op)``, keeps the first half as its new pending op and applies the
second.  So on a tie the op that reaches the server *later* goes first, on
every copy, which is what makes them converge.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

__all__ = [
    "Component",
    "OTClient",
    "OTError",
    "Op",
    "Pending",
    "apply",
    "base_length",
    "check",
    "compose",
    "diff_to_op",
    "is_noop",
    "lengths",
    "target_length",
    "transform",
    "transform_index",
]

Component = int | str
Op = list  # list[Component]; kept loose so JSON-decoded lists type-check
Size = Callable[[str], int]  # how long inserted text is: len (code points) or units.utf16_length


class OTError(ValueError):
    """An op is malformed or does not fit the document it is used with.

    ``str(err)`` is a sentence a person can read; the server sends it back as
    the ``message`` of a ``bad_message`` error.
    """


# -- building ops in normal form --------------------------------------------
# These appenders keep ``out`` in normal form as long as it already is: they
# merge, and put an insert before an adjacent delete (see module doc).


def _retain(out: Op, n: int) -> None:
    if out:
        last = out[-1]
        if type(last) is int and last > 0:
            out[-1] = last + n
            return
    out.append(n)


def _insert(out: Op, s: str) -> None:
    """Append an insert; next to a delete it goes before it (normal form)."""
    if out:
        last = out[-1]
        if type(last) is str:
            out[-1] = last + s
            return
        if type(last) is int and last < 0:
            if len(out) > 1 and type(out[-2]) is str:
                out[-2] += s
            else:
                out.insert(len(out) - 1, s)
            return
    out.append(s)


def _delete(out: Op, n: int) -> None:
    """Append a delete of ``n`` (> 0) characters."""
    if out:
        last = out[-1]
        if type(last) is int and last < 0:
            out[-1] = last - n
            return
    out.append(-n)


def _bad_component(i: int, c: object) -> OTError:
    if type(c) is int:
        return OTError(f"component {i} is 0; retains and deletes must be non-zero integers")
    if type(c) is str:
        if not c:
            return OTError(f"component {i} is an empty string; inserts must be non-empty")
        return OTError(f"component {i} inserts text containing a lone surrogate")
    kind = "a boolean" if type(c) is bool else f"of type {type(c).__name__}"
    return OTError(
        f"component {i} is {kind}; expected a non-zero integer (retain/delete) "
        "or a non-empty string (insert)"
    )


def _well_formed(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def lengths(op: Op, size: Size = len) -> tuple[int, int]:
    """Return ``(base_length(op), target_length(op))`` in one pass.

    ``size`` measures inserted text (see :func:`transform`).  Raises
    :class:`OTError` on a component of the wrong type (it does not look for
    lone surrogates: that is :func:`check`'s job).
    """
    if type(op) is not list and type(op) is not tuple:
        raise OTError("an operation must be a list of components")
    base = target = 0
    for i, c in enumerate(op):
        t = type(c)
        if t is int:
            if c > 0:
                base += c
                target += c
            elif c < 0:
                base -= c
            else:
                raise _bad_component(i, c)
        elif t is str and c:
            target += size(c)
        else:
            raise _bad_component(i, c)
    return base, target


# -- public functions --------------------------------------------------------


def check(op: object) -> Op:
    """Validate untrusted ``op`` and return it in normal form (a new list).

    Raises :class:`OTError` unless ``op`` is a list (or tuple) whose items are
    non-zero ``int`` (never ``bool``) or non-empty ``str`` without lone
    surrogates.  The result has the same effect as ``op``: adjacent
    same-kind components are merged, and the inserts and deletes between two
    retains become one insert followed by one delete.  Does not look at any
    document: length checks happen in :func:`apply`, :func:`compose` and
    :func:`transform`.
    """
    if type(op) is not list and type(op) is not tuple:
        raise OTError("an operation must be a list of components")
    out: Op = []
    run: list[str] = []  # the inserts since the last retain, joined once
    deleted = 0  # and the characters deleted since then
    for i, c in enumerate(op):
        t = type(c)
        if t is str and c and _well_formed(c):
            run.append(c)
            continue
        if t is not int or c == 0:
            raise _bad_component(i, c)
        if c < 0:
            deleted -= c
            continue
        if run or deleted:
            _flush_gap(out, run, deleted)
            run = []
            deleted = 0
            out.append(c)
        elif out:
            out[-1] += c  # only retains can precede a retain here
        else:
            out.append(c)
    _flush_gap(out, run, deleted)
    return out


def _flush_gap(out: Op, run: list[str], deleted: int) -> None:
    if run:
        out.append("".join(run))
    if deleted:
        out.append(-deleted)


def base_length(op: Op) -> int:
    """Length of the document ``op`` applies to (retained + deleted)."""
    return lengths(op)[0]


def target_length(op: Op) -> int:
    """Length of the document ``op`` produces (retained + inserted)."""
    return lengths(op)[1]


def is_noop(op: Op) -> bool:
    """True when ``op`` only retains (applying it changes nothing)."""
    return all(type(c) is int and c > 0 for c in op)


def apply(text: str, op: Op) -> str:
    """Return ``text`` with ``op`` applied.

    Raises :class:`OTError` if a component is invalid or ``base_length(op) !=
    len(text)`` (whole-document rule).
    """
    pieces: list[str] = []
    pos = 0
    size = len(text)
    for i, c in enumerate(op):
        t = type(c)
        if t is int and c > 0:
            end = pos + c
            if end > size:
                break
            pieces.append(text[pos:end])
            pos = end
        elif t is int and c < 0:
            pos -= c
            if pos > size:
                break
        elif t is str and c:
            pieces.append(c)
        else:
            raise _bad_component(i, c)
    else:
        if pos == size:
            return "".join(pieces)
    raise OTError(
        f"the operation is for a document of {base_length(op)} characters, "
        f"but this one has {size}"
    )


def compose(a: Op, b: Op) -> Op:
    """Return one op with the effect of ``a`` followed by ``b``.

    Contract: ``apply(apply(s, a), b) == apply(s, compose(a, b))``.  Raises
    :class:`OTError` if ``target_length(a) != base_length(b)`` or a component
    is invalid.  The result is in normal form.
    """
    if lengths(a)[1] != lengths(b)[0]:
        raise OTError(
            f"cannot compose: the first operation produces {target_length(a)} "
            f"characters but the second expects {base_length(b)}"
        )
    out: Op = []
    ia, ib = iter(a), iter(b)
    ca = next(ia, None)
    cb = next(ib, None)
    while ca is not None or cb is not None:
        if type(ca) is int and ca < 0:  # a's deletes happen first
            _delete(out, -ca)
            ca = next(ia, None)
            continue
        if type(cb) is str:  # b's inserts touch nothing of a's
            _insert(out, cb)
            cb = next(ib, None)
            continue
        if ca is None or cb is None:  # unreachable: lengths were checked
            raise OTError("cannot compose: operation lengths do not match")
        if type(ca) is int:  # a retains ...
            if cb > 0:  # ... b retains
                if ca > cb:
                    _retain(out, cb)
                    ca -= cb
                    cb = next(ib, None)
                elif ca == cb:
                    _retain(out, ca)
                    ca = next(ia, None)
                    cb = next(ib, None)
                else:
                    _retain(out, ca)
                    cb -= ca
                    ca = next(ia, None)
            else:  # ... b deletes
                d = -cb
                if ca > d:
                    _delete(out, d)
                    ca -= d
                    cb = next(ib, None)
                elif ca == d:
                    _delete(out, d)
                    ca = next(ia, None)
                    cb = next(ib, None)
                else:
                    _delete(out, ca)
                    cb += ca
                    ca = next(ia, None)
        else:  # a inserts ...
            size = len(ca)
            if cb > 0:  # ... b keeps (part of) it
                if size > cb:
                    _insert(out, ca[:cb])
                    ca = ca[cb:]
                    cb = next(ib, None)
                elif size == cb:
                    _insert(out, ca)
                    ca = next(ia, None)
                    cb = next(ib, None)
                else:
                    _insert(out, ca)
                    cb -= size
                    ca = next(ia, None)
            else:  # ... b deletes (part of) it: it never existed
                d = -cb
                if size > d:
                    ca = ca[d:]
                    cb = next(ib, None)
                elif size == d:
                    ca = next(ia, None)
                    cb = next(ib, None)
                else:
                    cb += size
                    ca = next(ia, None)
    return out


def transform(a: Op, b: Op, size: Size = len) -> tuple[Op, Op]:
    """Transform two concurrent ops on the same document against each other.

    Returns ``(a_prime, b_prime)`` such that
    ``apply(apply(s, a), b_prime) == apply(apply(s, b), a_prime)``.
    Tie-break: inserts at the same position put ``a``'s text first; pass the
    op being submitted (the server's incoming op, a client's own pending op)
    as ``a``, as ot.js and ShareDB do.  Raises
    :class:`OTError` if ``base_length(a) != base_length(b)`` or a component is
    invalid.  Both results are in normal form.

    ``size`` measures inserted text: ``len`` for ops counted in code points
    (everywhere in this module), :func:`realtime.units.utf16_length` for the
    same ops counted in UTF-16 code units (the server transforms those for
    clients that chose them).
    """
    if lengths(a)[0] != lengths(b)[0]:
        raise OTError(
            f"cannot transform: the operations are for documents of "
            f"{base_length(a)} and {base_length(b)} characters"
        )
    a2: Op = []
    b2: Op = []
    ia, ib = iter(a), iter(b)
    ca = next(ia, None)
    cb = next(ib, None)
    while ca is not None or cb is not None:
        if type(ca) is str:  # a's insert first: the tie-break
            _insert(a2, ca)
            _retain(b2, size(ca))
            ca = next(ia, None)
            continue
        if type(cb) is str:
            _retain(a2, size(cb))
            _insert(b2, cb)
            cb = next(ib, None)
            continue
        if ca is None or cb is None:  # unreachable: lengths were checked
            raise OTError("cannot transform: operation lengths do not match")
        # Both are retains or deletes over the same stretch of the base text.
        if ca > 0:
            if cb > 0:
                n = min(ca, cb)
                _retain(a2, n)
                _retain(b2, n)
            else:
                n = min(ca, -cb)
                _delete(b2, n)
            ca -= n
        else:
            if cb > 0:
                n = min(-ca, cb)
                _delete(a2, n)
            else:  # both delete it: nothing left to do for either
                n = min(-ca, -cb)
            ca += n
        cb = cb - n if cb > 0 else cb + n
        if ca == 0:
            ca = next(ia, None)
        if cb == 0:
            cb = next(ib, None)
    return a2, b2


def transform_index(index: int, op: Op, *, own: bool = False, size: Size = len) -> int:
    """Move a cursor position through ``op``.

    ``index`` is a code-point position in the document before ``op`` (``0 <=
    index <= base_length(op)``); the result is the same place after it.  A
    position inside deleted text moves to where the deletion was.  Text
    inserted exactly at ``index`` goes before the cursor when ``own`` is true
    (the cursor belongs to the op's author, who just typed it) and after it
    otherwise.  ``size`` measures inserted text (see :func:`transform`).
    Raises :class:`OTError` for a bad op or index.
    """
    base = lengths(op)[0]
    if type(index) is not int or not 0 <= index <= base:
        raise OTError(f"cursor position {index!r} is outside a document of {base} characters")
    pos = 0
    moved = index
    for c in op:
        if pos > index:
            break
        if type(c) is str:
            if pos < index or own:
                moved += size(c)
        elif c > 0:
            pos += c
        else:
            if pos < index:
                moved -= min(-c, index - pos)
            pos -= c
    return moved


def diff_to_op(old: str, new: str) -> Op:
    """Return a normal-form op turning ``old`` into ``new`` by replacing one span.

    The span lies between the longest common prefix and the longest common
    suffix (which never overlap).  Meant for a text field's before/after.
    """
    limit = min(len(old), len(new))
    start = 0
    while start < limit and old[start] == new[start]:
        start += 1
    end = 0
    limit -= start
    while end < limit and old[-1 - end] == new[-1 - end]:
        end += 1
    out: Op = []
    if start:
        out.append(start)
    inserted = new[start : len(new) - end]
    deleted = len(old) - end - start
    if inserted:
        out.append(inserted)
    if deleted:
        out.append(-deleted)
    if end:
        _retain(out, end)
    return out


# -- the client side ---------------------------------------------------------


class Pending(NamedTuple):
    """An op to send to the server: ``{"type": "op", "rev": ..., "op": ..., "seq": ...}``."""

    rev: int
    op: Op
    seq: int


class OTClient:
    """The client's half of the protocol: the three-state machine, sans I/O.

    The same machine as ``OTClient`` in static/js/ot.js (method names in
    snake_case); Python clients (bench, tests) use this one.

    * *synchronized*: nothing unacknowledged.
    * *awaiting_confirm*: ``outstanding`` was sent, no ack yet.
    * *awaiting_with_buffer*: also ``buffer``, local edits made since, composed
      into one op that is sent when ``outstanding`` is acknowledged.

    ``rev`` counts the server ops this client has seen (its own acks
    included); each sent op carries the ``rev`` it is based on.  Each op, when
    it becomes ``outstanding``, gets the next ``seq`` (1, 2, ...); the server
    drops a resent ``(client_id, seq)`` instead of applying it twice.

    Messages from the server: an ack of our op -> :meth:`server_ack`; somebody
    else's op -> :meth:`apply_server`, then apply the result to the local text.
    A server op carrying our own ``(client_id, seq)`` (see :meth:`is_own`) is an
    ack too: that is how it arrives in a catch-up after a reconnect.  After a
    reconnect: process the catch-up, then send :meth:`resend` if not ``None``.
    """

    def __init__(self, rev: int = 0, client_id: str | None = None) -> None:
        self.rev = rev
        self.client_id = client_id
        self.outstanding: Op | None = None
        self.outstanding_seq: int | None = None
        self.buffer: Op | None = None
        self.next_seq = 1

    @property
    def state(self) -> str:
        """``"synchronized"``, ``"awaiting_confirm"`` or ``"awaiting_with_buffer"``."""
        if self.outstanding is None:
            return "synchronized"
        return "awaiting_confirm" if self.buffer is None else "awaiting_with_buffer"

    def apply_client(self, op: Op) -> bool:
        """Record a local edit (already applied locally).  True: send :meth:`pending` now.

        The op is kept (and sent) in normal form: the form the server
        transforms, so both copies tie alike.  Raises :class:`OTError` for an
        invalid op.
        """
        op = check(op)
        if self.outstanding is None:
            self.outstanding = op
            self.outstanding_seq = self.next_seq
            self.next_seq += 1
            return True
        self.buffer = op if self.buffer is None else compose(self.buffer, op)
        return False

    def apply_server(self, op: Op) -> Op:
        """Take another client's op from the server; return it transformed for the local text.

        Our own unacknowledged edits are the submitted side: ``transform(own,
        server_op)``, so on a tie our insert goes first -- as it will on the
        server, which receives our op after this one.
        """
        self.rev += 1
        if self.outstanding is None:
            return op
        self.outstanding, op = transform(self.outstanding, op)
        if self.buffer is not None:
            self.buffer, op = transform(self.buffer, op)
        return op

    def server_ack(self, seq: int | None = None) -> Op | None:
        """Take the ack of ``outstanding``; return the op to send next (then :meth:`pending`) or None.

        An ack whose ``seq`` is given and is not ``outstanding_seq`` (a late
        ack of a resent op), or that arrives with nothing outstanding, is
        ignored.
        """
        if self.outstanding is None or (seq is not None and seq != self.outstanding_seq):
            return None
        self.rev += 1
        self.outstanding = self.buffer
        self.buffer = None
        if self.outstanding is None:
            self.outstanding_seq = None
        else:
            self.outstanding_seq = self.next_seq
            self.next_seq += 1
        return self.outstanding

    def is_own(self, client_id: str | None, seq: int | None) -> bool:
        """True if a server op with this ``(client_id, seq)`` is our ``outstanding`` op."""
        return (
            self.outstanding is not None
            and self.client_id is not None
            and client_id == self.client_id
            and seq == self.outstanding_seq
        )

    def pending(self) -> Pending | None:
        """The message to send for ``outstanding``, or None when synchronized."""
        if self.outstanding is None or self.outstanding_seq is None:
            return None
        return Pending(self.rev, self.outstanding, self.outstanding_seq)

    def pending_message(self) -> dict[str, Any] | None:
        """The ``op`` message (docs/PROTOCOL.md) for :meth:`pending`, or None."""
        p = self.pending()
        return None if p is None else {"type": "op", "rev": p.rev, "op": p.op, "seq": p.seq}

    def resend(self) -> Pending | None:
        """After a reconnect and its catch-up: what to send again (same seq), or None."""
        return self.pending()

    def catch_up(self, text: str, entries: list[dict[str, Any]]) -> str:
        """Take a resume's catch-up (the ``ops`` message after ``?rev=``): our
        own outstanding op among them is its ack, the others are applied to
        ``text`` (transformed over what we have not had acknowledged).
        Returns the new local text; entries at or below ``rev`` are skipped."""
        for e in entries:
            if e["rev"] <= self.rev:
                continue
            if self.is_own(e.get("client"), e.get("seq")):
                self.server_ack(e["seq"])
            else:
                text = apply(text, self.apply_server(e["op"]))
        return text

    def transform_cursor(self, index: int) -> int:
        """Map a position in the server's text at ``rev`` to the local text.

        The local text is the server's plus ``outstanding`` and ``buffer``;
        text we inserted at the position goes after it.
        """
        if self.outstanding is not None:
            index = transform_index(index, self.outstanding)
        if self.buffer is not None:
            index = transform_index(index, self.buffer)
        return index
