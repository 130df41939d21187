/**
 * Operational transformation for plain text: the browser twin of realtime/ot.py.
 *
 * Same rules, same results for the same input (tests/unit/test_ot_js.py runs
 * both and compares):
 *
 * - An op is an array of components: retain = positive integer, delete =
 *   negative integer (-n removes n characters), insert = non-empty string.
 * - Positions and lengths count Unicode code points, not UTF-16 code units.
 *   cpLength / utf16ToCp / cpToUtf16 convert for textarea indices.
 * - Whole-document rule: an op spans its document exactly (no implicit
 *   trailing retain); the identity op on n characters is [n].
 * - Normal form (check, compose, transform, diffToOp return it): no zero or
 *   empty components, adjacent same-kind components merged, an insert next to
 *   a delete placed before it ([-1, 'x'] becomes ['x', -1], as ot.js's
 *   TextOperation does), trailing retain kept. The order matters: the two tie
 *   differently against a concurrent insert, and the server's copy of our op
 *   must transform exactly like ours.
 * - Tie-break: transform(a, b) puts a's insert first when both insert at one
 *   position. As in ot.js and ShareDB, the op being submitted is `a`: the
 *   server runs transform(incoming, logged), OTClient runs
 *   transform(ownPending, serverOp). So on a tie the op that reaches the
 *   server later goes first, on every copy, and every copy converges.
 */

export class OTError extends Error {
  constructor(message) {
    super(message);
    this.name = 'OTError';
  }
}

const HAS_SURROGATE = /[\uD800-\uDFFF]/;
const PAIRS = /[\uD800-\uDBFF][\uDC00-\uDFFF]/g;
// No lookbehind: older Safari cannot parse it, and one bad regex breaks the module.
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?:^|[^\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const wellFormed = String.prototype.isWellFormed
  ? (s) => s.isWellFormed()
  : (s) => !LONE_SURROGATE.test(s);

const isHigh = (u) => u >= 0xd800 && u <= 0xdbff;
const isLow = (u) => u >= 0xdc00 && u <= 0xdfff;

// -- code points vs UTF-16 ---------------------------------------------------

/** Number of code points in `s` (a lone surrogate counts as one). */
export function cpLength(s) {
  if (!HAS_SURROGATE.test(s)) return s.length;
  const pairs = s.match(PAIRS);
  return s.length - (pairs ? pairs.length : 0);
}

/**
 * Move `n` code points forward from UTF-16 index `i` of `s`.
 * Returns the new UTF-16 index, or -1 if `s` ends first.
 */
function advance(s, i, n) {
  const size = s.length;
  while (n > 0) {
    if (i >= size) return -1;
    if (isHigh(s.charCodeAt(i)) && i + 1 < size && isLow(s.charCodeAt(i + 1))) i += 2;
    else i += 1;
    n -= 1;
  }
  return i;
}

/**
 * Code-point index of UTF-16 index `i` in `s` (0 <= i <= s.length). An index
 * between the halves of a surrogate pair rounds down to the pair's start.
 */
export function utf16ToCp(s, i) {
  if (!Number.isInteger(i) || i < 0 || i > s.length) {
    throw new RangeError(`UTF-16 index ${i} is outside a string of length ${s.length}`);
  }
  let cp = cpLength(s.slice(0, i));
  if (i > 0 && i < s.length && isHigh(s.charCodeAt(i - 1)) && isLow(s.charCodeAt(i))) cp -= 1;
  return cp;
}

/** UTF-16 index of code-point index `cp` in `s`; RangeError past the end. */
export function cpToUtf16(s, cp) {
  if (!Number.isInteger(cp) || cp < 0) throw new RangeError(`bad code point index ${cp}`);
  if (!HAS_SURROGATE.test(s)) {
    if (cp > s.length) throw new RangeError(`code point index ${cp} is past the end`);
    return cp;
  }
  const i = advance(s, 0, cp);
  if (i < 0) throw new RangeError(`code point index ${cp} is past the end`);
  return i;
}

/** The first `n` code points of `s`, and the rest. */
function splitCp(s, n) {
  const i = HAS_SURROGATE.test(s) ? advance(s, 0, n) : n;
  return [s.slice(0, i), s.slice(i)];
}

// -- building ops in normal form ----------------------------------------------

function pushRetain(out, n) {
  const k = out.length;
  if (k && typeof out[k - 1] === 'number' && out[k - 1] > 0) out[k - 1] += n;
  else out.push(n);
}

/** Append an insert; next to a delete it goes before it (normal form). */
function pushInsert(out, s) {
  const k = out.length;
  if (k && typeof out[k - 1] === 'string') {
    out[k - 1] += s;
  } else if (k && out[k - 1] < 0) {
    if (k > 1 && typeof out[k - 2] === 'string') out[k - 2] += s;
    else out.splice(k - 1, 0, s);
  } else {
    out.push(s);
  }
}

/** Append a delete of n (> 0) characters. */
function pushDelete(out, n) {
  const k = out.length;
  if (k && typeof out[k - 1] === 'number' && out[k - 1] < 0) out[k - 1] -= n;
  else out.push(-n);
}

function badComponent(i, c) {
  if (typeof c === 'number' && c === 0) {
    return new OTError(`component ${i} is 0; retains and deletes must be non-zero integers`);
  }
  if (typeof c === 'string') {
    if (!c) return new OTError(`component ${i} is an empty string; inserts must be non-empty`);
    return new OTError(`component ${i} inserts text containing a lone surrogate`);
  }
  const kind = typeof c === 'boolean' ? 'a boolean' : `of type ${c === null ? 'null' : typeof c}`;
  return new OTError(
    `component ${i} is ${kind}; expected a non-zero integer (retain/delete) ` +
      'or a non-empty string (insert)',
  );
}

const isCount = (c) => typeof c === 'number' && Number.isSafeInteger(c) && c !== 0;

/** [baseLength, targetLength] in one pass; OTError on a component of the wrong type. */
export function lengths(op) {
  if (!Array.isArray(op)) throw new OTError('an operation must be a list of components');
  let base = 0;
  let target = 0;
  for (let i = 0; i < op.length; i++) {
    const c = op[i];
    if (isCount(c)) {
      if (c > 0) {
        base += c;
        target += c;
      } else {
        base -= c;
      }
    } else if (typeof c === 'string' && c) {
      target += cpLength(c);
    } else {
      throw badComponent(i, c);
    }
  }
  return [base, target];
}

// -- public functions ----------------------------------------------------------

/**
 * Validate an untrusted op and return it in normal form (a new array) with
 * the same effect: same-kind neighbours merged, and the inserts and deletes
 * between two retains become one insert followed by one delete.
 */
export function check(op) {
  if (!Array.isArray(op)) throw new OTError('an operation must be a list of components');
  const out = [];
  let run = []; // the inserts since the last retain, joined once
  let deleted = 0; // and the characters deleted since then
  const flushGap = () => {
    if (run.length) out.push(run.join(''));
    if (deleted) out.push(-deleted);
    run = [];
    deleted = 0;
  };
  for (let i = 0; i < op.length; i++) {
    const c = op[i];
    if (typeof c === 'string' && c && wellFormed(c)) {
      run.push(c);
      continue;
    }
    if (!isCount(c)) throw badComponent(i, c);
    if (c < 0) {
      deleted -= c;
    } else if (run.length || deleted) {
      flushGap();
      out.push(c);
    } else if (out.length) {
      out[out.length - 1] += c; // only retains can precede a retain here
    } else {
      out.push(c);
    }
  }
  flushGap();
  return out;
}

export const baseLength = (op) => lengths(op)[0];
export const targetLength = (op) => lengths(op)[1];

/** True when op only retains. */
export const isNoop = (op) => op.every((c) => typeof c === 'number' && c > 0);

/** Apply op to text; OTError unless baseLength(op) === cpLength(text). */
export function apply(text, op) {
  if (!Array.isArray(op)) throw new OTError('an operation must be a list of components');
  const bmp = !HAS_SURROGATE.test(text);
  const size = text.length;
  const pieces = [];
  let i = 0; // UTF-16 index into text
  let fits = true;
  for (let k = 0; k < op.length; k++) {
    const c = op[k];
    if (isCount(c)) {
      const n = c > 0 ? c : -c;
      const j = bmp ? (i + n <= size ? i + n : -1) : advance(text, i, n);
      if (j < 0) {
        fits = false;
        break;
      }
      if (c > 0) pieces.push(text.slice(i, j));
      i = j;
    } else if (typeof c === 'string' && c) {
      pieces.push(c);
    } else {
      throw badComponent(k, c);
    }
  }
  if (fits && i === size) return pieces.join('');
  throw new OTError(
    `the operation is for a document of ${baseLength(op)} characters, ` +
      `but this one has ${cpLength(text)}`,
  );
}

/** One op with the effect of a then b: apply(apply(s, a), b) === apply(s, compose(a, b)). */
export function compose(a, b) {
  const ta = lengths(a)[1];
  const bb = lengths(b)[0];
  if (ta !== bb) {
    throw new OTError(
      `cannot compose: the first operation produces ${ta} characters but the second expects ${bb}`,
    );
  }
  const out = [];
  let ia = 0;
  let ib = 0;
  let ca = a[ia++];
  let cb = b[ib++];
  while (ca !== undefined || cb !== undefined) {
    if (typeof ca === 'number' && ca < 0) {
      pushDelete(out, -ca);
      ca = a[ia++];
      continue;
    }
    if (typeof cb === 'string') {
      pushInsert(out, cb);
      cb = b[ib++];
      continue;
    }
    if (ca === undefined || cb === undefined) {
      throw new OTError('cannot compose: operation lengths do not match');
    }
    if (typeof ca === 'number') {
      if (cb > 0) {
        const n = Math.min(ca, cb);
        pushRetain(out, n);
        ca -= n;
        cb -= n;
      } else {
        const n = Math.min(ca, -cb);
        pushDelete(out, n);
        ca -= n;
        cb += n;
      }
      if (ca === 0) ca = a[ia++];
      if (cb === 0) cb = b[ib++];
    } else {
      const size = cpLength(ca);
      const n = Math.min(size, cb > 0 ? cb : -cb);
      const [head, rest] = n < size ? splitCp(ca, n) : [ca, ''];
      if (cb > 0) pushInsert(out, head);
      ca = rest || a[ia++];
      cb = cb > 0 ? cb - n : cb + n;
      if (cb === 0) cb = b[ib++];
    }
  }
  return out;
}

/**
 * Transform concurrent ops a and b (same base) into [aPrime, bPrime] with
 * apply(apply(s, a), bPrime) === apply(apply(s, b), aPrime). a's insert goes
 * first on a tie: pass the op being submitted (the server's incoming op, a
 * client's own pending op) as a, as ot.js and ShareDB do.
 */
export function transform(a, b) {
  const la = lengths(a)[0];
  const lb = lengths(b)[0];
  if (la !== lb) {
    throw new OTError(
      `cannot transform: the operations are for documents of ${la} and ${lb} characters`,
    );
  }
  const a2 = [];
  const b2 = [];
  let ia = 0;
  let ib = 0;
  let ca = a[ia++];
  let cb = b[ib++];
  while (ca !== undefined || cb !== undefined) {
    if (typeof ca === 'string') {
      pushInsert(a2, ca);
      pushRetain(b2, cpLength(ca));
      ca = a[ia++];
      continue;
    }
    if (typeof cb === 'string') {
      pushRetain(a2, cpLength(cb));
      pushInsert(b2, cb);
      cb = b[ib++];
      continue;
    }
    if (ca === undefined || cb === undefined) {
      throw new OTError('cannot transform: operation lengths do not match');
    }
    const n = Math.min(Math.abs(ca), Math.abs(cb));
    if (ca > 0 && cb > 0) {
      pushRetain(a2, n);
      pushRetain(b2, n);
    } else if (ca > 0) {
      pushDelete(b2, n);
    } else if (cb > 0) {
      pushDelete(a2, n);
    }
    ca = ca > 0 ? ca - n : ca + n;
    cb = cb > 0 ? cb - n : cb + n;
    if (ca === 0) ca = a[ia++];
    if (cb === 0) cb = b[ib++];
  }
  return [a2, b2];
}

/**
 * Move code-point position `index` through op. Text inserted exactly at the
 * position goes before it when `own` (the op's author's cursor), after it
 * otherwise. OTError for a bad op or an index outside 0..baseLength(op).
 */
export function transformIndex(index, op, own = false) {
  const size = lengths(op)[0];
  if (!Number.isInteger(index) || index < 0 || index > size) {
    throw new OTError(`cursor position ${index} is outside a document of ${size} characters`);
  }
  let pos = 0;
  let moved = index;
  for (const c of op) {
    if (pos > index) break;
    if (typeof c === 'string') {
      if (pos < index || own) moved += cpLength(c);
    } else if (c > 0) {
      pos += c;
    } else {
      if (pos < index) moved -= Math.min(-c, index - pos);
      pos -= c;
    }
  }
  return moved;
}

/**
 * The op turning oldText into newText by replacing the span between their
 * common prefix and common suffix (a textarea edit). Works in code points and
 * never splits a surrogate pair.
 */
export function diffToOp(oldText, newText) {
  let limit = Math.min(oldText.length, newText.length);
  let start = 0;
  while (start < limit && oldText.charCodeAt(start) === newText.charCodeAt(start)) start++;
  if (start > 0 && isHigh(oldText.charCodeAt(start - 1))) start--; // don't split a pair
  limit -= start;
  let end = 0;
  while (
    end < limit &&
    oldText.charCodeAt(oldText.length - 1 - end) === newText.charCodeAt(newText.length - 1 - end)
  ) {
    end++;
  }
  if (end > 0 && isLow(oldText.charCodeAt(oldText.length - end))) end--;
  const out = [];
  const prefix = oldText.slice(0, start);
  if (start) out.push(cpLength(prefix));
  const inserted = newText.slice(start, newText.length - end);
  const deleted = cpLength(oldText.slice(start, oldText.length - end));
  if (inserted) out.push(inserted);
  if (deleted) out.push(-deleted);
  if (end) pushRetain(out, cpLength(oldText.slice(oldText.length - end)));
  return out;
}

// -- the client state machine ---------------------------------------------------

/**
 * The client's half of the protocol, sans I/O; the same machine as OTClient
 * in realtime/ot.py.
 *
 * States: 'synchronized' (nothing unacknowledged), 'awaitingConfirm'
 * (`outstanding` sent, no ack yet), 'awaitingWithBuffer' (plus `buffer`: local
 * edits since, composed, sent once `outstanding` is acknowledged).
 *
 * `rev` counts server ops seen (own acks included); a sent op carries the rev
 * it is based on. Each op gets the next `seq` (1, 2, ...) when it becomes
 * outstanding; the server ignores a resent (clientId, seq).
 *
 * Usage: local edit -> applyClient(op); if true, send pending(). Ack ->
 * serverAck(seq); if it returns an op, send pending(). Another client's op ->
 * applyServer(op) and apply the result to the text. A server op with our own
 * (clientId, seq) -- isOwn() -- is an ack (it comes that way in the catch-up
 * after a reconnect). After reconnecting: process the catch-up, then send
 * resend() if not null.
 */
export class OTClient {
  constructor(rev = 0, clientId = null) {
    this.rev = rev;
    this.clientId = clientId;
    this.outstanding = null;
    this.outstandingSeq = null;
    this.buffer = null;
    this.nextSeq = 1;
  }

  get state() {
    if (this.outstanding === null) return 'synchronized';
    return this.buffer === null ? 'awaitingConfirm' : 'awaitingWithBuffer';
  }

  /**
   * A local edit (already applied to the local text). Returns true: send
   * pending() now. Kept (and sent) in normal form, the form the server
   * transforms; OTError for an invalid op.
   */
  applyClient(op) {
    op = check(op);
    if (this.outstanding === null) {
      this.outstanding = op;
      this.outstandingSeq = this.nextSeq++;
      return true;
    }
    this.buffer = this.buffer === null ? op : compose(this.buffer, op);
    return false;
  }

  /**
   * Another client's op from the server; returns it transformed for the local
   * text. Our unacknowledged edits are the submitted side,
   * transform(own, serverOp): on a tie our insert goes first, as it will on
   * the server, which receives our op after this one.
   */
  applyServer(op) {
    this.rev += 1;
    if (this.outstanding === null) return op;
    let s;
    [this.outstanding, s] = transform(this.outstanding, op);
    if (this.buffer !== null) [this.buffer, s] = transform(this.buffer, s);
    return s;
  }

  /**
   * The ack of `outstanding`; returns the op to send next (then pending()) or
   * null. Ignored (null) when nothing is outstanding or `seq` is given and is
   * not outstandingSeq (a late ack of a resent op).
   */
  serverAck(seq = null) {
    if (this.outstanding === null || (seq !== null && seq !== undefined && seq !== this.outstandingSeq)) {
      return null;
    }
    this.rev += 1;
    this.outstanding = this.buffer;
    this.buffer = null;
    this.outstandingSeq = this.outstanding === null ? null : this.nextSeq++;
    return this.outstanding;
  }

  /** True if a server op with this (clientId, seq) is our outstanding op. */
  isOwn(clientId, seq) {
    return (
      this.outstanding !== null &&
      this.clientId !== null &&
      clientId === this.clientId &&
      seq === this.outstandingSeq
    );
  }

  /** {rev, op, seq} to send for `outstanding`, or null when synchronized. */
  pending() {
    if (this.outstanding === null) return null;
    return { rev: this.rev, op: this.outstanding, seq: this.outstandingSeq };
  }

  /** After a reconnect and its catch-up: what to send again (same seq), or null. */
  resend() {
    return this.pending();
  }

  /**
   * Map a code-point position in the server's text at `rev` to the local text
   * (server text + outstanding + buffer); our text inserted there goes after it.
   */
  transformCursor(index) {
    if (this.outstanding !== null) index = transformIndex(index, this.outstanding);
    if (this.buffer !== null) index = transformIndex(index, this.buffer);
    return index;
  }
}
