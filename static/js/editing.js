/**
 * The editing page (/edit/<doc>): a textarea kept in step with the server by the
 * OT client state machine of ot.js, over the shared reconnecting client.
 *
 *   local edit    input event -> diffToOp(previous text, new text) in code points ->
 *                 OTClient.applyClient; the outstanding op is sent at most every SEND_GAP ms,
 *                 edits made meanwhile are composed into one buffered op.
 *   server        ack -> serverAck(seq) (then send the buffer); op -> applyServer, applied to
 *                 the textarea with the local selection moved through it (transformIndex,
 *                 UTF-16 <-> code points); snapshot -> replace everything.
 *   reconnect     ?rev=<our rev>&client=<our client id>: the server answers with the ops we
 *                 missed ("ops"), our own op among them counts as its ack (isOwn); then we
 *                 resend what is still unacknowledged -- same seq, so never applied twice.
 *   cursors       ours is sent (throttled) when we are synchronized, as code points at our
 *                 rev; the others' are kept in local code points, moved through every op and
 *                 drawn on a mirror layer above the textarea, with their names.
 *
 * State for tests and people: #editor[data-state=loading|ready], [data-sync=loading|saved|
 * saving|offline|readonly], [data-rev]; window.__editor exposes text, rev and counters.
 */

import { RealtimeClient, bindStatus } from "./client.js";
import {
  OTClient,
  apply,
  cpLength,
  cpToUtf16,
  diffToOp,
  isNoop,
  transformIndex,
  utf16ToCp,
} from "./ot.js";
import { store } from "./dom.js";

// Pacing, so that ops + cursors stay under the server's limits (sent with the snapshot):
// at most 60 % of rate_limit for ops (and edit_rate), 30 % for cursors.
let SEND_GAP = 80; // ms between op messages
let CURSOR_GAP = 200; // ms between cursor messages
const NAME_KEY = "rt.chat.name"; // shared with the chat page: one name everywhere
const COLORS = 8;

const root = document.getElementById("editor");
const docId = root.dataset.doc;
const ta = document.getElementById("text");
const overlay = document.getElementById("overlay");
const stack = document.getElementById("stack");
const syncPill = document.getElementById("sync-state");
const statsEl = document.getElementById("doc-stats");
const revEl = document.getElementById("doc-rev");
const peerStack = document.getElementById("peer-stack");
const peopleList = document.getElementById("people");
const peopleCount = document.getElementById("people-count");
const noticesEl = document.getElementById("notices");
const nameForm = document.getElementById("name-form");
const nameInput = document.getElementById("name-input");
const nameSave = document.getElementById("name-save");
const copyBtn = document.getElementById("copy-link");
const copyLabel = document.getElementById("copy-label");

// -- state ------------------------------------------------------------------------------

let ot = null; // OTClient once the first snapshot is in
let shadow = ""; // the textarea's text as the OT client knows it
let me = null; // {client, user, color}
let limits = null;
let readonly = false;
let connected = false; // a snapshot or catch-up arrived on the current socket
let resync = false; // next connection: ask for a fresh snapshot (our state is unusable)
let sentSeq = null; // seq of the outstanding op already sent on this socket
let lastSend = 0;
let sendTimer = null;
let cursorTimer = null;
let cursorDirty = false;
let lastCursor = "";
let composing = false;
const held = []; // server messages held while an IME composition is open
const peers = new Map(); // client id -> {client, user, color}
const cursors = new Map(); // client id -> {anchor, head} in code points of the local text
const stats = { opsSent: 0, acks: 0, remoteOps: 0, concurrent: 0, resent: 0, snapshots: 0, catchUps: 0 };

// -- connection -------------------------------------------------------------------------

const client = new RealtimeClient(`/ws/edit/${encodeURIComponent(docId)}`, {
  welcome: false, // the first message is a snapshot (or the catch-up), not a welcome
  heartbeat: 25000,
  params: () => {
    const p = { name: store.get(NAME_KEY, "") || undefined };
    if (ot && !resync) {
      p.rev = ot.rev;
      if (ot.clientId) p.client = ot.clientId;
    }
    return p;
  },
  onMessage: (msg) => {
    if (composing && msg && msg.type !== "cursor") {
      held.push(msg);
      return;
    }
    safely(msg);
  },
  onState: (state) => {
    if (state !== "open") {
      connected = false;
      sentSeq = null;
      clearTimeout(sendTimer);
      sendTimer = null;
    }
    renderSync();
  },
});

/** Handle one message; if our state cannot take it, start again from a fresh snapshot. */
function safely(msg) {
  try {
    handle(msg);
  } catch (e) {
    console.error("editor: could not apply a message from the server; reloading the document", e, msg);
    resync = true;
    client.reconnect();
  }
}

function handle(msg) {
  if (!msg || typeof msg.type !== "string") return;
  switch (msg.type) {
    case "snapshot":
      onSnapshot(msg);
      break;
    case "ops":
      onCatchUp(msg);
      break;
    case "ack":
      onAck(msg);
      break;
    case "op":
      onRemoteOp(msg);
      break;
    case "cursor":
      onCursor(msg);
      break;
    case "peer_joined":
      peers.set(msg.client, { client: msg.client, user: msg.user, color: msg.color });
      renderPeers();
      break;
    case "peer_left":
      peers.delete(msg.client);
      cursors.delete(msg.client);
      renderPeers();
      scheduleRender();
      break;
    case "error":
      onError(msg);
      break;
    case "refreshed": // a fresh token: its roles decide from now on
      if (typeof msg.readonly === "boolean") {
        readonly = msg.readonly;
        ta.readOnly = readonly;
        renderSync();
      }
      break;
    default:
      break;
  }
}

function welcome(msg) {
  me = { client: msg.client, user: msg.user, color: msg.color };
  limits = msg.limits || null;
  if (limits) {
    const opsPerSec = Math.min(limits.edit_rate > 0 ? limits.edit_rate * 0.9 : Infinity,
      limits.rate > 0 ? limits.rate * 0.6 : Infinity);
    SEND_GAP = Math.max(80, Number.isFinite(opsPerSec) ? Math.ceil(1000 / opsPerSec) : 0);
    CURSOR_GAP = Math.max(200, limits.rate > 0 ? Math.ceil(1000 / (limits.rate * 0.3)) : 0);
  }
  readonly = !!msg.readonly;
  ta.readOnly = readonly;
  peers.clear();
  cursors.clear();
  for (const p of msg.peers || []) {
    peers.set(p.client, { client: p.client, user: p.user, color: p.color });
  }
  if (!nameInput.value && msg.user) nameInput.value = msg.user.name;
  connected = true;
  sentSeq = null;
  root.dataset.state = "ready";
  ta.disabled = false;
  document.getElementById("paper-skeleton").hidden = true;
}

function onSnapshot(msg) {
  readLocalInput();
  const lost = ot && !resync && ot.outstanding !== null ? shadow : null;
  const sel = selectionCp();
  ot = new OTClient(msg.rev, msg.client);
  resync = false;
  stats.snapshots += 1;
  welcome(msg);
  setText(msg.text, sel ? [Math.min(sel[0], cpLength(msg.text)), Math.min(sel[1], cpLength(msg.text))] : null);
  placeCursors(msg.peers || [], (pos) => pos);
  if (lost !== null && lost !== msg.text) {
    notice("warn", "You were away too long for your last changes to be merged, so the document was reloaded.", {
      label: "Copy your version",
      run: () => copyText(lost),
    });
  }
  renderAll();
  markCursorDirty();
}

function onCatchUp(msg) {
  if (!ot) {
    resync = true;
    client.reconnect();
    return;
  }
  stats.catchUps += 1;
  for (const entry of msg.ops) {
    if (ot.isOwn(entry.client, entry.seq)) {
      ot.serverAck(entry.seq); // our op made it before the connection dropped
    } else {
      applyRemote(ot.applyServer(entry.op), entry.client);
    }
  }
  if (ot.rev !== msg.rev) {
    // Should not happen; a fresh snapshot puts things right.
    resync = true;
    client.reconnect();
    return;
  }
  ot.clientId = msg.client;
  welcome(msg);
  placeCursors(msg.peers || [], (pos) => ot.transformCursor(pos));
  renderAll();
  if (ot.outstanding !== null) stats.resent += 1;
  flushOutgoing();
  markCursorDirty();
}

function onAck(msg) {
  if (!ot || msg.seq !== ot.outstandingSeq) return; // a late ack of an op already acknowledged
  stats.acks += 1;
  const next = ot.serverAck(msg.seq);
  sentSeq = null;
  if (next !== null) flushOutgoing();
  if (ot.state === "synchronized" && cursorDirty) scheduleCursor();
  renderSync();
}

function onRemoteOp(msg) {
  if (!ot) return;
  if (ot.isOwn(msg.client, msg.seq)) {
    onAck(msg);
    return;
  }
  if (ot.outstanding !== null) stats.concurrent += 1;
  stats.remoteOps += 1;
  readLocalInput();
  applyRemote(ot.applyServer(msg.op), msg.client);
  renderSync();
}

function onCursor(msg) {
  if (!ot || msg.rev !== ot.rev || !peers.has(msg.client)) return;
  try {
    cursors.set(msg.client, { anchor: ot.transformCursor(msg.anchor), head: ot.transformCursor(msg.head) });
  } catch (e) {
    return; // a position that does not fit: skip this one, the next will
  }
  scheduleRender();
}

function onError(msg) {
  const ours = ot && msg.seq !== undefined && msg.seq === ot.outstandingSeq;
  if (!ours) {
    if (msg.seq === undefined) console.warn("editor:", msg.code, msg.message);
    return;
  }
  sentSeq = null;
  if (msg.code === "rate_limited" || msg.code === "unavailable") {
    lastSend = Date.now() + 1000; // resend the same op (same seq) in a moment
    flushOutgoing();
    return;
  }
  // The server cannot use our op: our copy has drifted. Start again from its text.
  notice("error", `Your last change could not be saved (${msg.message}). The document was reloaded.`, {
    label: "Copy your version",
    run: ((text) => () => copyText(text))(shadow),
  });
  resync = true;
  client.reconnect();
}

// -- local edits ------------------------------------------------------------------------

/** Turn whatever the textarea holds now into an op (if it changed). */
function readLocalInput() {
  const now = ta.value;
  if (now === shadow || !ot) return;
  const op = diffToOp(shadow, now);
  if (isNoop(op)) {
    shadow = now;
    return;
  }
  const refusal = tooBig(op, now);
  if (refusal) {
    const sel = selectionCp();
    setText(shadow, sel);
    notice("warn", refusal);
    return;
  }
  shadow = now;
  for (const cur of cursors.values()) {
    cur.anchor = transformIndex(cur.anchor, op);
    cur.head = transformIndex(cur.head, op);
  }
  if (ot.applyClient(op)) flushOutgoing();
  renderAll();
  markCursorDirty();
}

function tooBig(op, text) {
  if (!limits) return null;
  let inserted = 0;
  for (const c of op) if (typeof c === "string") inserted += cpLength(c);
  if (inserted > limits.max_op_size) {
    return `That paste is too long (${inserted.toLocaleString()} characters; one change can add at most ${limits.max_op_size.toLocaleString()}).`;
  }
  const size = cpLength(text);
  if (size > limits.max_doc_size && size > cpLength(shadow)) {
    return `The document is full: it can hold ${limits.max_doc_size.toLocaleString()} characters.`;
  }
  if (limits.max_message_bytes && new TextEncoder().encode(JSON.stringify(op)).length > limits.max_message_bytes - 256) {
    return "That change is too large to send at once; paste it in smaller parts.";
  }
  return null;
}

/** Send the outstanding op if it is not on the wire yet, at most every SEND_GAP ms. */
function flushOutgoing() {
  if (!ot || !connected) return;
  const p = ot.pending();
  if (p === null || sentSeq === p.seq) return;
  const wait = lastSend + SEND_GAP - Date.now();
  if (wait > 0) {
    if (!sendTimer) {
      sendTimer = setTimeout(() => {
        sendTimer = null;
        flushOutgoing();
      }, wait);
    }
    return;
  }
  if (client.send({ type: "op", rev: p.rev, op: p.op, seq: p.seq })) {
    sentSeq = p.seq;
    lastSend = Date.now();
    stats.opsSent += 1;
  }
  renderSync();
}

// -- applying text ------------------------------------------------------------------------

/** [anchor-side start, end, direction] of the textarea selection in code points. */
function selectionCp() {
  const text = ta.value;
  try {
    return [utf16ToCp(text, ta.selectionStart), utf16ToCp(text, ta.selectionEnd), ta.selectionDirection];
  } catch (e) {
    return null;
  }
}

function setText(text, sel) {
  ta.value = text;
  shadow = text;
  if (sel) {
    const size = cpLength(text);
    ta.setSelectionRange(
      cpToUtf16(text, Math.min(sel[0], size)),
      cpToUtf16(text, Math.min(sel[1], size)),
      sel[2] || "none",
    );
  }
}

/** Apply a server op (already transformed for the local text), keeping our selection. */
function applyRemote(op, author) {
  const sel = selectionCp();
  const text = apply(shadow, op);
  const moved = sel ? [transformIndex(sel[0], op), transformIndex(sel[1], op), sel[2]] : null;
  setText(text, moved);
  for (const [id, cur] of cursors) {
    const own = id === author; // the author's caret follows what it typed
    cur.anchor = transformIndex(cur.anchor, op, own);
    cur.head = transformIndex(cur.head, op, own);
  }
  renderAll();
}

function placeCursors(list, map) {
  for (const p of list) {
    if (!p.cursor) continue;
    try {
      cursors.set(p.client, { anchor: map(p.cursor.anchor), head: map(p.cursor.head) });
    } catch (e) {
      /* out of range: wait for the next update */
    }
  }
}

// -- our cursor ---------------------------------------------------------------------------

function markCursorDirty() {
  cursorDirty = true;
  scheduleCursor();
}

function scheduleCursor() {
  if (cursorTimer) return;
  cursorTimer = setTimeout(sendCursor, CURSOR_GAP);
}

function sendCursor() {
  cursorTimer = null;
  if (!cursorDirty || !ot || !connected) return;
  if (ot.state !== "synchronized") return; // positions must be in the server's text; retried on ack
  const sel = selectionCp();
  if (!sel) return;
  const backward = sel[2] === "backward";
  const anchor = backward ? sel[1] : sel[0];
  const head = backward ? sel[0] : sel[1];
  const key = `${ot.rev}:${anchor}:${head}`;
  cursorDirty = false;
  if (key === lastCursor) return;
  if (client.send({ type: "cursor", rev: ot.rev, anchor, head })) lastCursor = key;
}

// -- rendering ------------------------------------------------------------------------------

let renderQueued = false;

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    renderOverlay();
  });
}

function renderAll() {
  scheduleRender(); // the mirror (and the height) once per frame, however fast the edits
  renderSync();
  renderPeers();
}

function colorOf(c) {
  return ((Number(c) % COLORS) + COLORS) % COLORS;
}

function initials(name) {
  const parts = String(name || "?").trim().split(/\s+/).filter(Boolean);
  const chars = parts.length > 1 ? [parts[0], parts[parts.length - 1]] : [parts[0] || "?"];
  return chars.map((p) => Array.from(p)[0] || "").join("").toUpperCase();
}

/** Mirror the text above the textarea (invisible) with the others' selections and carets. */
function renderOverlay() {
  const text = shadow;
  const marks = [];
  for (const [id, cur] of cursors) {
    const peer = peers.get(id);
    if (!peer) continue;
    let anchor;
    let head;
    try {
      anchor = cpToUtf16(text, cur.anchor);
      head = cpToUtf16(text, cur.head);
    } catch (e) {
      continue;
    }
    marks.push({ id, peer, from: Math.min(anchor, head), to: Math.max(anchor, head), head });
  }
  const points = new Set([0, text.length]);
  for (const m of marks) {
    points.add(m.from);
    points.add(m.to);
  }
  const sorted = [...points].sort((a, b) => a - b);
  const frag = document.createDocumentFragment();
  for (let i = 0; i < sorted.length; i++) {
    const at = sorted[i];
    for (const m of marks) {
      if (m.head === at) frag.append(caret(m));
    }
    if (i + 1 >= sorted.length) break;
    const next = sorted[i + 1];
    const piece = text.slice(at, next);
    const cover = marks.find((m) => m.from <= at && m.to >= next && m.from !== m.to);
    if (cover) {
      const mark = document.createElement("mark");
      mark.className = `rsel pc-${colorOf(cover.peer.color)}`;
      mark.textContent = piece;
      frag.append(mark);
    } else {
      frag.append(document.createTextNode(piece));
    }
  }
  frag.append(document.createTextNode("\u200b")); // keeps a trailing empty line measurable
  overlay.replaceChildren(frag);
  autosize();
}

function caret(m) {
  const el = document.createElement("span");
  el.className = `rcaret pc-${colorOf(m.peer.color)}`;
  el.dataset.client = m.id;
  const label = document.createElement("span");
  label.className = "rcaret-label";
  label.textContent = (m.peer.user && m.peer.user.name) || "someone";
  el.append(label);
  return el;
}

let lastHeight = 0;

function autosize() {
  // The mirror has the same width, font and wrapping as the textarea: its height is the text's.
  const h = Math.ceil(overlay.scrollHeight);
  if (h && h !== lastHeight) {
    lastHeight = h;
    ta.style.height = `${h}px`;
  }
  if (ta.scrollTop) ta.scrollTop = 0;
}

function renderSync() {
  let state;
  let label;
  if (!ot) {
    state = "loading";
    label = "Loading…";
  } else if (!connected) {
    const unsaved = ot.outstanding !== null;
    state = "offline";
    label = unsaved ? "Offline · changes kept" : "Offline";
  } else if (readonly) {
    state = "readonly";
    label = "Read only";
  } else if (ot.outstanding !== null) {
    state = "saving";
    label = "Saving…";
  } else {
    state = "saved";
    label = "Saved";
  }
  if (root.dataset.sync !== state) {
    root.dataset.sync = state;
    syncPill.dataset.sync = state;
    syncPill.textContent = label;
  } else if (syncPill.textContent !== label) {
    syncPill.textContent = label;
  }
  if (ot) {
    root.dataset.rev = String(ot.rev);
    revEl.textContent = `rev ${ot.rev.toLocaleString()}`;
    const chars = cpLength(shadow);
    const words = (shadow.match(/\S+/g) || []).length;
    statsEl.textContent = `${words.toLocaleString()} ${words === 1 ? "word" : "words"} · ${chars.toLocaleString()} ${chars === 1 ? "character" : "characters"}`;
  }
}

function renderPeers() {
  const everyone = me ? [{ ...me, self: true }, ...peers.values()] : [...peers.values()];
  peopleCount.textContent = String(everyone.length);
  peopleList.replaceChildren(
    ...everyone.map((p) => {
      const li = document.createElement("li");
      li.className = `person${p.self ? " self" : ""}`;
      li.dataset.client = p.client;
      const av = document.createElement("span");
      av.className = `avatar avatar-sm av-${colorOf(p.color)}`;
      av.textContent = initials(p.user && p.user.name);
      av.setAttribute("aria-hidden", "true");
      const name = document.createElement("span");
      name.className = "person-name";
      name.textContent = (p.user && p.user.name) || "someone";
      li.append(av, name);
      if (p.self) {
        const tag = document.createElement("span");
        tag.className = "person-tag";
        tag.textContent = "you";
        li.append(tag);
      }
      return li;
    }),
  );
  const shown = everyone.slice(0, 4);
  const items = shown.map((p) => {
    const li = document.createElement("li");
    const av = document.createElement("span");
    av.className = `avatar avatar-sm av-${colorOf(p.color)}`;
    av.textContent = initials(p.user && p.user.name);
    av.title = p.self ? `${p.user.name} (you)` : p.user.name;
    li.append(av);
    return li;
  });
  if (everyone.length > shown.length) {
    const li = document.createElement("li");
    const more = document.createElement("span");
    more.className = "avatar avatar-sm peer-more";
    more.textContent = `+${everyone.length - shown.length}`;
    li.append(more);
    items.push(li);
  }
  peerStack.replaceChildren(...items);
}

// -- notices --------------------------------------------------------------------------------

function notice(kind, text, action) {
  const el = document.createElement("div");
  el.className = `notice notice-${kind}`;
  el.setAttribute("role", kind === "error" ? "alert" : "status");
  const body = document.createElement("span");
  body.className = "notice-text";
  body.textContent = text;
  el.append(body);
  if (action) {
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "link-btn";
    btn.textContent = action.label;
    btn.addEventListener("click", action.run);
    el.append(btn);
  }
  const close = document.createElement("button");
  close.type = "button";
  close.className = "notice-close";
  close.setAttribute("aria-label", "Dismiss");
  close.textContent = "×";
  close.addEventListener("click", () => el.remove());
  el.append(close);
  noticesEl.append(el);
  while (noticesEl.children.length > 3) noticesEl.firstElementChild.remove();
  if (kind !== "error" && !action) setTimeout(() => el.remove(), 8000);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    notice("ok", "Copied to the clipboard.");
  } catch (e) {
    notice("error", "The clipboard is not available here.");
  }
}

// -- wiring ------------------------------------------------------------------------------------

ta.addEventListener("input", () => {
  if (!composing) readLocalInput();
});
ta.addEventListener("compositionstart", () => {
  composing = true;
});
ta.addEventListener("compositionend", () => {
  composing = false;
  readLocalInput();
  while (held.length && !composing) safely(held.shift());
});
for (const ev of ["select", "keyup", "mouseup", "focus"]) ta.addEventListener(ev, markCursorDirty);
document.addEventListener("selectionchange", () => {
  if (document.activeElement === ta) markCursorDirty();
});

new ResizeObserver(() => {
  lastHeight = 0;
  autosize();
}).observe(stack);

nameInput.value = store.get(NAME_KEY, "") || "";
nameInput.addEventListener("input", () => {
  const current = (me && me.user && me.user.name) || "";
  nameSave.hidden = !nameInput.value.trim() || nameInput.value.trim() === current;
});
nameForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = nameInput.value.trim();
  if (!name) return;
  store.set(NAME_KEY, name);
  nameSave.hidden = true;
  readLocalInput();
  client.reconnect(); // resumes with ?rev=&client=: nothing is lost
});

copyBtn.addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText(window.location.href);
    copyLabel.textContent = "Link copied";
  } catch (e) {
    copyLabel.textContent = "Copy the address bar";
  }
  setTimeout(() => {
    copyLabel.textContent = "Share";
  }, 1800);
});

window.__editor = {
  get text() {
    return shadow;
  },
  get rev() {
    return ot ? ot.rev : null;
  },
  get state() {
    return ot ? ot.state : "loading";
  },
  get client() {
    return ot ? ot.clientId : null;
  },
  stats,
};

bindStatus(client, document.getElementById("conn-state"));
client.connect();
renderSync();
