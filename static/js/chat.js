/**
 * The chat page: rooms, history, presence, typing, and messages that are never lost or
 * shown twice.
 *
 * Durability, from the person's side:
 * - A message you send appears at once as "pending" (kept in localStorage's outbox, so it
 *   even survives a reload) and turns "confirmed" on its `ack` or on its own broadcast,
 *   whichever comes first. The same `cid` is resent after a reconnect or if no ack comes;
 *   the server stores it once.
 * - Every message is keyed by its room `seq`: a second copy (resume overlap, ack/broadcast
 *   race) is dropped.
 * - On reconnect each room is re-joined with `since` (the last seq seen) and `epoch`;
 *   `recovered: false` replaces the list with the server's recent history.
 *
 * Everything a person typed is put in the page with textContent, never as HTML.
 */

import { RealtimeClient, bindStatus } from "./client.js";
import { $, h, store } from "./dom.js";

const ROOM_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const NAME_MAX = 32;
const BAD_NAME_CHARS = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}]/u;
const GROUP_MS = 5 * 60 * 1000; // consecutive messages of one person within this are grouped
const KEEP = 500; // messages kept on screen per room
const TYPING_SEND_MS = 2000;
const TYPING_SHOW_MS = 4000;
const RESEND_MS = 8000; // resend a message that has had no ack for this long
const KEYS = { name: "rt.chat.name", rooms: "rt.chat.rooms", active: "rt.chat.active", outbox: "rt.chat.outbox" };

// -- small helpers -------------------------------------------------------------


function newCid() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "c" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const cpLength = (s) => Array.from(s).length; // the server counts code points

function cleanName(raw) {
  const name = (raw || "").normalize("NFC").trim();
  if (!name) return { name: "" };
  if (cpLength(name) > NAME_MAX) return { error: `Names are at most ${NAME_MAX} characters.` };
  if (BAD_NAME_CHARS.test(name)) return { error: "That name has characters that can't be shown." };
  return { name };
}

function cleanRoom(raw) {
  const name = (raw || "").trim().replace(/^#/, "").replace(/\s+/g, "-").toLowerCase();
  if (!name) return { error: "Type a room name." };
  if (!ROOM_RE.test(name)) return { error: "Use letters, digits, '-', '_' or '.' (up to 64)." };
  return { name };
}

function hueOf(id) {
  let x = 0x811c9dc5; // FNV-1a: spreads similar ids over the 8 colours
  for (const ch of String(id)) x = Math.imul(x ^ ch.codePointAt(0), 0x01000193) >>> 0;
  return ((x ^ (x >>> 16)) >>> 0) % 8;
}

function initials(name) {
  const words = String(name || "?").trim().split(/[\s._-]+/).filter(Boolean);
  const letters = words.slice(0, 2).map((w) => Array.from(w)[0]);
  return (letters.join("") || "?").toUpperCase();
}

function avatar(id, name, extra = "") {
  const node = h("span", `avatar av-${hueOf(id)} ${extra}`.trim(), initials(name));
  node.setAttribute("aria-hidden", "true");
  return node;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "short" });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: "long", month: "long", day: "numeric" });

function dayKey(ts) {
  const d = new Date(ts);
  return d.getFullYear() * 10000 + d.getMonth() * 100 + d.getDate();
}

function dayLabel(ts) {
  const today = dayKey(Date.now());
  const key = dayKey(ts);
  if (key === today) return "Today";
  if (key === dayKey(Date.now() - 86400000)) return "Yesterday";
  return dayFmt.format(new Date(ts));
}

// -- page elements -------------------------------------------------------------

const ui = {
  chat: $("chat"),
  roomList: $("room-list"),
  joinForm: $("join-form"),
  joinInput: $("join-input"),
  joinError: $("join-error"),
  nameForm: $("name-form"),
  nameInput: $("name-input"),
  nameSave: $("name-save"),
  nameError: $("name-error"),
  meAvatar: $("me-avatar"),
  roomName: $("room-name"),
  roomSub: $("room-sub"),
  roomsToggle: $("rooms-toggle"),
  membersToggle: $("members-toggle"),
  membersToggleCount: $("members-toggle-count"),
  notices: $("notices"),
  messages: $("messages"),
  jump: $("jump"),
  typing: $("typing"),
  composer: $("composer"),
  text: $("text"),
  counter: $("counter"),
  send: $("send"),
  memberCount: $("member-count"),
  memberList: $("member-list"),
  scrim: $("scrim"),
  roomsBadge: $("rooms-toggle-badge"),
};

// -- state ---------------------------------------------------------------------

let me = null; // {id, name} from the welcome
let limits = { max_text: 2000, max_rooms: 20 };
const rooms = new Map(); // name -> Room, in sidebar order
let active = null; // the Room on screen
const lastTypingSent = new Map(); // room -> ms

class Room {
  constructor(name) {
    this.name = name;
    this.epoch = null;
    this.seq = 0; // last seq seen
    this.everJoined = false;
    this.joined = false;
    this.members = new Map(); // id -> name
    this.memberCount = 0;
    this.unread = 0;
    this.typing = new Map(); // user id -> {name, timer}
    this.bySeq = new Map(); // seq -> <li>
    this.pending = new Map(); // cid -> <li>
    this.list = h("ol", "msg-list");
    this.list.dataset.room = name;
    this.list.setAttribute("aria-label", `Messages in ${name}`);
    this.scrollTop = null; // null = stuck to the bottom
  }
}

// -- the connection ------------------------------------------------------------

const client = new RealtimeClient("/ws/chat", {
  params: () => ({ name: store.get(KEYS.name, "") }),
  heartbeat: 25000,
  onOpen: onWelcome,
  onMessage: onServerMessage,
  onState: onConnState,
});

function onWelcome(welcome) {
  me = welcome.user;
  limits = { ...limits, ...(welcome.limits || {}) };
  renderMe();
  for (const li of allPending()) {
    li._m.user = me.id;
    li._m.name = me.name;
    decorate(li, li.previousElementSibling);
  }
  let n = 0;
  for (const room of rooms.values()) {
    if (n++ >= limits.max_rooms) break;
    sendJoin(room);
  }
  updateComposer();
  renderMembers();
}

function sendJoin(room) {
  const msg = { type: "join", room: room.name, ref: "join:" + room.name };
  if (room.everJoined && room.epoch) {
    msg.since = room.seq;
    msg.epoch = room.epoch;
  }
  room.resuming = room.everJoined;
  client.send(msg);
}

function onConnState(state, detail) {
  ui.chat.dataset.conn = state;
  if (state !== "open") {
    for (const room of rooms.values()) {
      room.joined = false;
      clearTyping(room);
    }
    if (state === "closed" && detail.fatal) notice(detail.message, "error", { timeout: 0 });
    else if (detail.code === 1008 && detail.retryAt) notice(`${detail.message}. We'll try again in a minute.`, "warn", { timeout: 0 });
  }
  renderRoomHead();
  updateComposer();
}

function onServerMessage(msg) {
  switch (msg.type) {
    case "joined":
      return onJoined(msg);
    case "message":
      return onChatMessage(msg, { live: true });
    case "deleted":
    case "member":
      return onEntry(msg, { live: true });
    case "ack":
      return onAck(msg);
    case "presence":
      return onPresence(msg);
    case "typing":
      return onTyping(msg);
    case "left":
      return onLeft(msg);
    case "error":
      return onError(msg);
    default:
      return;
  }
}

// -- rooms ---------------------------------------------------------------------

function saveRooms() {
  store.set(KEYS.rooms, [...rooms.keys()]);
}

function addRoom(name, { activate = true } = {}) {
  let room = rooms.get(name);
  if (!room) {
    if (rooms.size >= limits.max_rooms) {
      showFieldError(ui.joinError, `You can be in at most ${limits.max_rooms} rooms. Leave one first.`);
      return null;
    }
    room = new Room(name);
    rooms.set(name, room);
    saveRooms();
    if (client.state === "open") sendJoin(room);
  }
  if (activate) setActive(room);
  renderRooms();
  return room;
}

function leaveRoom(room) {
  if (room.joined) client.send({ type: "leave", room: room.name, ref: "leave:" + room.name });
  for (const cid of room.pending.keys()) outboxRemove(cid);
  clearTyping(room);
  rooms.delete(room.name);
  saveRooms();
  if (active === room) {
    const next = rooms.values().next().value || null;
    active = null;
    if (next) setActive(next);
    else {
      ui.messages.replaceChildren(emptyRooms());
      renderRoomHead();
      renderMembers();
      updateComposer();
    }
  }
  renderRooms();
}

function emptyRooms() {
  const box = h("div", "empty-state");
  box.append(h("p", "empty-title", "You're not in any room"), h("p", "muted", "Join one from the list, e.g. lobby."));
  return box;
}

function setActive(room) {
  if (active === room) return;
  if (active) active.scrollTop = atBottom() ? null : ui.messages.scrollTop;
  active = room;
  room.unread = 0;
  store.set(KEYS.active, room.name);
  if (decodeURIComponent(location.hash.slice(1)) !== room.name) {
    history.replaceState(null, "", "#" + encodeURIComponent(room.name));
  }
  ui.messages.replaceChildren(room.list);
  if (room.scrollTop === null) scrollToBottom();
  else ui.messages.scrollTop = room.scrollTop;
  ui.jump.hidden = true;
  ui.text.placeholder = `Message #${room.name}`;
  closePanels();
  renderRooms();
  renderRoomHead();
  renderMembers();
  renderTyping();
  updateComposer();
  updateTitle();
}

function renderRooms() {
  const items = [];
  for (const room of rooms.values()) {
    const li = h("li", "room-item");
    const btn = h("button", "room-btn");
    btn.type = "button";
    if (room === active) {
      li.classList.add("active");
      btn.setAttribute("aria-current", "true");
    }
    btn.append(h("span", "hash", "#"), h("span", "room-label", room.name));
    if (room.unread > 0 && room !== active) {
      const badge = h("span", "badge", room.unread > 99 ? "99+" : String(room.unread));
      badge.setAttribute("aria-label", `${room.unread} unread`);
      btn.append(badge);
      li.classList.add("unread");
    }
    btn.addEventListener("click", () => setActive(room));
    const close = h("button", "room-leave", "×");
    close.type = "button";
    close.title = `Leave #${room.name}`;
    close.setAttribute("aria-label", `Leave ${room.name}`);
    close.addEventListener("click", () => leaveRoom(room));
    li.append(btn, close);
    items.push(li);
  }
  ui.roomList.replaceChildren(...items);
}

function renderRoomHead() {
  ui.roomName.textContent = active ? active.name : "no room";
  let sub;
  const state = client.state;
  if (!active) sub = "Join a room to start";
  else if (state === "open" && active.joined) {
    const n = active.memberCount;
    sub = n === 1 ? "Just you here" : `${n} people here`;
  } else if (state === "open") sub = "Joining…";
  else if (state === "offline") sub = "Offline · messages will be sent when you're back";
  else if (state === "closed") sub = "Disconnected";
  else sub = "Reconnecting · messages will be sent when you're back";
  ui.roomSub.textContent = sub;
  ui.chat.dataset.joined = String(!!active && active.joined && state === "open");
  ui.membersToggleCount.textContent = active ? String(active.memberCount) : "0";
}

// -- messages ------------------------------------------------------------------

function makeMessage(m, own) {
  const li = h("li", own ? "msg own" : "msg");
  li._m = m;
  const row = h("div", "msg-row");
  const body = h("div", "msg-body");
  const meta = h("div", "msg-meta");
  meta.append(h("span", "msg-name", m.name), h("time", "msg-time"));
  const text = h("div", "msg-text", m.deleted ? "Message deleted" : m.text); // textContent: never HTML
  if (m.deleted) li.classList.add("deleted");
  const status = h("div", "msg-status");
  body.append(meta, text, status);
  row.append(avatar(m.user, m.name, "msg-avatar"), body);
  li.append(row);
  paintMessage(li);
  return li;
}

function paintMessage(li) {
  const m = li._m;
  if (m.seq !== null && m.seq !== undefined) li.dataset.seq = String(m.seq);
  else delete li.dataset.seq;
  if (m.cid) li.dataset.cid = m.cid;
  const time = li.querySelector(".msg-time");
  const date = new Date(m.ts);
  time.textContent = timeFmt.format(date);
  time.dateTime = date.toISOString();
  li.title = fullFmt.format(date);
  li.querySelector(".msg-name").textContent = m.name || "";
}

function setStatus(li, kind, text) {
  li.classList.toggle("pending", kind === "pending");
  li.classList.toggle("failed", kind === "failed");
  const status = li.querySelector(".msg-status");
  status.replaceChildren();
  if (kind === "pending") status.textContent = "Sending…";
  if (kind === "failed") {
    const retry = h("button", "link-btn", "Retry");
    retry.type = "button";
    retry.addEventListener("click", () => retryFailed(li));
    const discard = h("button", "link-btn", "Discard");
    discard.type = "button";
    discard.addEventListener("click", () => discardFailed(li));
    status.append(h("span", null, `Not sent: ${text}`), " ", retry, " · ", discard);
  }
}

/** Day separator and grouping of `li`, given the message before it. */
function decorate(li, prev) {
  if (!li || !li._m) return;
  const m = li._m;
  const p = prev && prev._m;
  const dayStart = !p || dayKey(p.ts) !== dayKey(m.ts);
  const grouped = !dayStart && p.user === m.user && m.ts - p.ts < GROUP_MS && !p.failed;
  li.classList.toggle("day-start", dayStart);
  if (dayStart) li.dataset.day = dayLabel(m.ts);
  else delete li.dataset.day;
  li.classList.toggle("grouped", grouped);
}

/** Put `li` where it belongs: confirmed messages by seq, pending ones at the end. */
function place(room, li) {
  const list = room.list;
  const oldNext = li.parentNode ? li.nextElementSibling : null;
  if (li.parentNode) li.remove();
  const seq = li._m.seq;
  if (seq === null || seq === undefined) {
    list.append(li);
  } else {
    let node = list.lastElementChild;
    while (node && (node._m.seq === null || node._m.seq === undefined || node._m.seq > seq)) {
      node = node.previousElementSibling;
    }
    if (node) node.after(li);
    else list.prepend(li);
  }
  decorate(li, li.previousElementSibling);
  decorate(li.nextElementSibling, li);
  if (oldNext && oldNext !== li.nextElementSibling) decorate(oldNext, oldNext.previousElementSibling);
}

function unplace(li) {
  const next = li.nextElementSibling;
  li.remove();
  if (next) decorate(next, next.previousElementSibling);
}

function trim(room) {
  if (room === active && !atBottom()) return; // don't move what the person is reading
  while (room.bySeq.size > KEEP) {
    const first = room.list.firstElementChild;
    if (!first || first._m.seq === null || first._m.seq === undefined) break;
    room.bySeq.delete(first._m.seq);
    unplace(first);
  }
}

/** Any entry of a room's history or live stream: messages, tombstones, membership changes. */
function onEntry(m, opts) {
  if (m.type === "message") return onChatMessage(m, opts);
  const room = rooms.get(m.room);
  if (!room || typeof m.seq !== "number") return false;
  room.seq = Math.max(room.seq, m.seq);
  if (m.type === "deleted") {
    const li = room.bySeq.get(m.target);
    if (li && !li._m.deleted) {
      li._m = { ...li._m, text: "", deleted: true };
      li.classList.add("deleted");
      li.querySelector(".msg-text").textContent = "Message deleted";
    }
  } else if (m.type === "member" && opts && opts.live && me && m.user !== me.id) {
    const what = m.event === "removed" ? "removed" : "added";
    notice(`${m.by.name} ${what} ${m.user} ${what === "removed" ? "from" : "to"} #${room.name}`, "info",
      { timeout: 5000, subtle: true });
  }
  return false;
}

/** Left a room: asked for, or removed from it by its owner or a moderator. */
function onLeft(msg) {
  const room = rooms.get(msg.room);
  if (!room || msg.reason !== "removed") return;
  room.joined = false;
  notice(`You were removed from #${room.name}`, "warn");
  leaveRoom(room);
}

/** A committed message, live or from history.  Returns true if it was new. */
function onChatMessage(m, { live = false, quiet = false } = {}) {
  const room = rooms.get(m.room);
  if (!room || typeof m.seq !== "number") return false;
  const existing = room.bySeq.get(m.seq);
  if (existing) {
    // Seen already (ack came first, or resume overlap): take the server's time and name.
    existing._m.ts = m.ts;
    existing._m.name = m.name;
    paintMessage(existing);
    room.seq = Math.max(room.seq, m.seq);
    return false;
  }
  const own = !!me && m.user === me.id;
  const stick = room === active && atBottom();
  let li = own && m.cid ? room.pending.get(m.cid) : null;
  if (li) {
    room.pending.delete(m.cid);
    outboxRemove(m.cid);
    li._m = { ...m };
    paintMessage(li);
    setStatus(li, "ok");
  } else {
    li = makeMessage({ ...m }, own);
  }
  room.bySeq.set(m.seq, li);
  place(room, li);
  room.seq = Math.max(room.seq, m.seq);
  if (!own && room.members.has(m.user) && room.members.get(m.user) !== m.name) {
    room.members.set(m.user, m.name); // a rename the presence events did not carry
    if (room === active) renderMembers();
  }
  const typer = room.typing.get(m.user);
  if (typer) {
    clearTimeout(typer.timer);
    room.typing.delete(m.user);
    if (room === active) renderTyping();
  }
  if (!quiet && !own) {
    if (room !== active || document.hidden) {
      room.unread += 1;
      renderRooms();
      updateTitle();
    }
  }
  if (room === active) {
    if (stick || (own && live)) scrollToBottom();
    else if (!quiet) ui.jump.hidden = false;
  }
  trim(room);
  return true;
}

function onAck(ack) {
  const room = rooms.get(ack.room);
  if (!room || !ack.cid) return;
  const li = room.pending.get(ack.cid);
  if (!li) return; // the broadcast already confirmed it
  room.pending.delete(ack.cid);
  outboxRemove(ack.cid);
  if (room.bySeq.has(ack.seq)) {
    unplace(li); // history already holds this message
    return;
  }
  li._m.seq = ack.seq;
  paintMessage(li);
  setStatus(li, "ok");
  room.bySeq.set(ack.seq, li);
  place(room, li);
}

function onJoined(j) {
  const room = rooms.get(j.room);
  if (!room) {
    client.send({ type: "leave", room: j.room, ref: "leave:" + j.room }); // left meanwhile
    return;
  }
  const resumed = room.resuming;
  const stick = room === active && atBottom();
  if (j.recovered) {
    for (const m of j.messages) onEntry(m, { quiet: false });
  } else {
    const had = room.bySeq.size > 0;
    for (const li of room.bySeq.values()) li.remove();
    room.bySeq.clear();
    room.seq = 0;
    for (const m of j.messages) onEntry(m, { quiet: true });
    for (const li of room.list.children) decorate(li, li.previousElementSibling);
    if (resumed && had) notice(`History of #${room.name} reloaded`, "info", { timeout: 5000, subtle: true });
  }
  room.epoch = j.epoch;
  room.seq = Math.max(room.seq, j.seq);
  room.joined = true;
  room.everJoined = true;
  room.members = new Map((j.members || []).map((u) => [u.id, u.name]));
  room.memberCount = j.member_count ?? room.members.size;
  if (room === active) {
    if (stick || !resumed) scrollToBottom();
    renderRoomHead();
    renderMembers();
    updateComposer();
  }
  for (const li of room.pending.values()) {
    if (!li.classList.contains("failed")) transmit(room, li);
  }
  ui.chat.dataset.ready = "true";
}

// -- sending -------------------------------------------------------------------

function transmit(room, li) {
  const m = li._m;
  li._sentAt = Date.now();
  return client.send({ type: "say", room: room.name, text: m.text, cid: m.cid, ref: m.cid });
}

function allPending() {
  const out = [];
  for (const room of rooms.values()) out.push(...room.pending.values());
  return out;
}

function sendText(raw) {
  const room = active;
  const text = raw.replace(/^\s*\n|\s+$/g, "");
  if (!room || !text.trim()) return false;
  if (cpLength(text) > limits.max_text) return false;
  const m = {
    room: room.name,
    cid: newCid(),
    text,
    user: me ? me.id : "me",
    name: me ? me.name : "",
    ts: Date.now(),
    seq: null,
  };
  const li = makeMessage(m, true);
  setStatus(li, "pending");
  room.pending.set(m.cid, li);
  place(room, li);
  outboxAdd(m);
  if (room.joined) transmit(room, li);
  scrollToBottom();
  lastTypingSent.delete(room.name);
  return true;
}

function retryFailed(li) {
  const room = rooms.get(li._m.room);
  if (!room) return;
  li._m.failed = false;
  setStatus(li, "pending");
  room.pending.set(li._m.cid, li);
  outboxAdd(li._m);
  if (room.joined) transmit(room, li);
}

function discardFailed(li) {
  const room = rooms.get(li._m.room);
  if (room) room.pending.delete(li._m.cid);
  outboxRemove(li._m.cid);
  unplace(li);
}

function markFailed(li, message) {
  li._m.failed = true;
  setStatus(li, "failed", message);
  outboxRemove(li._m.cid);
}

// Messages that are neither acked nor failed after RESEND_MS go out again (same cid).
setInterval(() => {
  if (client.state !== "open") return;
  const now = Date.now();
  for (const room of rooms.values()) {
    if (!room.joined) continue;
    for (const li of room.pending.values()) {
      if (!li._m.failed && now - (li._sentAt || 0) > RESEND_MS) transmit(room, li);
    }
  }
}, 2000);

// The outbox: pending messages survive a reload and are sent (once) when possible.
function outboxAdd(m) {
  const box = store.get(KEYS.outbox, []).filter((x) => x.cid !== m.cid);
  box.push({ room: m.room, cid: m.cid, text: m.text, ts: m.ts });
  store.set(KEYS.outbox, box.slice(-100));
}

function outboxRemove(cid) {
  const box = store.get(KEYS.outbox, []);
  const rest = box.filter((x) => x.cid !== cid);
  if (rest.length !== box.length) store.set(KEYS.outbox, rest);
}

function restoreOutbox() {
  for (const item of store.get(KEYS.outbox, [])) {
    const room = rooms.get(item.room);
    if (!room || typeof item.text !== "string" || !item.cid) continue;
    const li = makeMessage({ ...item, user: "me", name: "", seq: null }, true);
    setStatus(li, "pending");
    room.pending.set(item.cid, li);
    place(room, li);
  }
}

// -- presence and typing -------------------------------------------------------

function onPresence(p) {
  const room = rooms.get(p.room);
  if (!room) return;
  const add = (u) => u && room.members.set(u.id, u.name);
  const drop = (u) => {
    if (!u) return;
    room.members.delete(u.id);
    const t = room.typing.get(u.id);
    if (t) {
      clearTimeout(t.timer);
      room.typing.delete(u.id);
    }
  };
  if (p.event === "join") add(p.user);
  else if (p.event === "leave") drop(p.user);
  else if (p.event === "diff") {
    (p.left || []).forEach(drop);
    (p.joined || []).forEach(add);
  } else if (p.event === "sync") {
    room.members = new Map((p.members || []).map((u) => [u.id, u.name]));
  }
  if (typeof p.member_count === "number") room.memberCount = p.member_count;
  if (room === active) {
    renderRoomHead();
    renderMembers();
    renderTyping();
  }
}

function renderMembers() {
  const room = active;
  const items = [];
  let count = 0;
  if (room) {
    const list = [...room.members.entries()].map(([id, name]) => ({
      id,
      name: me && id === me.id ? me.name : name,
      self: !!me && id === me.id,
    }));
    list.sort((a, b) => (a.self !== b.self ? (a.self ? -1 : 1) : a.name.localeCompare(b.name)));
    for (const u of list) {
      const li = h("li", u.self ? "member self" : "member");
      li.append(avatar(u.id, u.name, "avatar-sm"), h("span", "member-name", u.name));
      if (u.self) li.append(h("span", "member-tag", "you"));
      items.push(li);
    }
    count = Math.max(room.memberCount, list.length);
    if (room.memberCount > list.length) items.push(h("li", "member more muted", `and ${room.memberCount - list.length} more`));
  }
  ui.memberList.replaceChildren(...items);
  ui.memberCount.textContent = String(count);
  ui.membersToggleCount.textContent = String(count);
}

function onTyping(t) {
  const room = rooms.get(t.room);
  if (!room || !t.user || (me && t.user.id === me.id)) return;
  const prev = room.typing.get(t.user.id);
  if (prev) clearTimeout(prev.timer);
  const timer = setTimeout(() => {
    room.typing.delete(t.user.id);
    if (room === active) renderTyping();
  }, TYPING_SHOW_MS);
  room.typing.set(t.user.id, { name: t.user.name, timer });
  if (room === active) renderTyping();
}

function clearTyping(room) {
  for (const t of room.typing.values()) clearTimeout(t.timer);
  room.typing.clear();
  if (room === active) renderTyping();
}

function renderTyping() {
  const names = active ? [...active.typing.values()].map((t) => t.name) : [];
  if (!names.length) {
    ui.typing.replaceChildren();
    ui.typing.classList.remove("visible");
    return;
  }
  const dots = h("span", "dots");
  dots.setAttribute("aria-hidden", "true");
  dots.append(h("i"), h("i"), h("i"));
  const parts = [dots];
  if (names.length === 1) parts.push(h("strong", null, names[0]), " is typing…");
  else if (names.length === 2) parts.push(h("strong", null, names[0]), " and ", h("strong", null, names[1]), " are typing…");
  else parts.push("Several people are typing…");
  ui.typing.replaceChildren(...parts);
  ui.typing.classList.add("visible");
}

// -- errors and notices --------------------------------------------------------

const FRIENDLY = {
  rate_limited: "You're sending messages too fast. Slow down a little.",
  unavailable: "The server is busy; your message will be retried.",
};

function onError(e) {
  const ref = typeof e.ref === "string" ? e.ref : "";
  if (ref.startsWith("join:")) {
    const room = rooms.get(ref.slice(5));
    if (e.code === "conflict" || !room) return; // already in it
    notice(`Couldn't join #${room.name}: ${e.message}`, "error");
    if (e.code !== "unavailable") leaveRoom(room);
    return;
  }
  if (ref.startsWith("leave:") || ref === "typing") return;
  if (ref) {
    for (const room of rooms.values()) {
      const li = room.pending.get(ref);
      if (!li) continue;
      if (e.code === "rate_limited" || e.code === "unavailable") {
        li._sentAt = Date.now(); // the resend timer tries again
        notice(FRIENDLY[e.code], "warn");
      } else {
        room.pending.delete(ref);
        markFailed(li, e.message);
      }
      return;
    }
  }
  notice(FRIENDLY[e.code] || e.message || "Something went wrong", e.code === "rate_limited" ? "warn" : "error");
}

function notice(text, kind = "info", { timeout = 8000, subtle = false } = {}) {
  for (const node of ui.notices.children) {
    if (node._text === text) {
      node.remove(); // show it again, fresh
      break;
    }
  }
  const node = h("div", `notice notice-${kind}${subtle ? " notice-subtle" : ""}`);
  node._text = text;
  node.setAttribute("role", kind === "error" ? "alert" : "status");
  const close = h("button", "notice-close", "×");
  close.type = "button";
  close.setAttribute("aria-label", "Dismiss");
  close.addEventListener("click", () => node.remove());
  node.append(h("span", "notice-text", text), close);
  ui.notices.append(node);
  while (ui.notices.children.length > 3) ui.notices.firstElementChild.remove();
  if (timeout) setTimeout(() => node.remove(), timeout);
}

function showFieldError(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

// -- scrolling -----------------------------------------------------------------

function atBottom() {
  const s = ui.messages;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 48;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
  ui.jump.hidden = true;
}

ui.messages.addEventListener("scroll", () => {
  if (atBottom()) ui.jump.hidden = true;
});
ui.jump.addEventListener("click", () => {
  scrollToBottom();
  ui.text.focus();
});

// -- composer ------------------------------------------------------------------

function updateComposer() {
  const text = ui.text.value;
  const max = limits.max_text;
  const n = text.length > max * 0.7 ? cpLength(text) : text.length;
  const left = max - n;
  if (n >= max * 0.8) {
    ui.counter.hidden = false;
    ui.counter.textContent = left >= 0 ? `${left} left` : `${-left} over the limit`;
    ui.counter.classList.toggle("over", left < 0);
  } else {
    ui.counter.hidden = true;
  }
  ui.send.disabled = !active || !text.trim() || left < 0;
  ui.text.disabled = !active;
  ui.composer.classList.toggle("over", left < 0);
}

function autosize() {
  ui.text.style.height = "auto";
  ui.text.style.height = Math.min(ui.text.scrollHeight, 200) + "px";
}

ui.text.addEventListener("input", () => {
  autosize();
  updateComposer();
  const room = active;
  if (room && room.joined && ui.text.value.trim()) {
    const now = Date.now();
    if (now - (lastTypingSent.get(room.name) || 0) >= TYPING_SEND_MS) {
      lastTypingSent.set(room.name, now);
      client.send({ type: "typing", room: room.name, ref: "typing" });
    }
  }
});

ui.text.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  if (ui.send.disabled) return;
  if (sendText(ui.text.value)) {
    ui.text.value = "";
    autosize();
    updateComposer();
  }
  ui.text.focus();
});

// -- joining rooms and the name --------------------------------------------------

ui.joinForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const { name, error } = cleanRoom(ui.joinInput.value);
  showFieldError(ui.joinError, error);
  if (error) return;
  if (addRoom(name)) ui.joinInput.value = "";
});
ui.joinInput.addEventListener("input", () => showFieldError(ui.joinError, ""));

function renderMe() {
  const name = me ? me.name : store.get(KEYS.name, "") || "?";
  if (document.activeElement !== ui.nameInput) ui.nameInput.value = me ? me.name : store.get(KEYS.name, "");
  ui.meAvatar.textContent = initials(name);
  ui.meAvatar.className = `avatar avatar-sm av-${me ? hueOf(me.id) : 0}`;
  ui.nameSave.hidden = true;
}

ui.nameInput.addEventListener("input", () => {
  showFieldError(ui.nameError, "");
  const current = me ? me.name : store.get(KEYS.name, "");
  ui.nameSave.hidden = ui.nameInput.value.trim() === current;
});

ui.nameForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const { name, error } = cleanName(ui.nameInput.value);
  showFieldError(ui.nameError, error);
  if (error) return;
  ui.nameSave.hidden = true;
  if (me && name === me.name) return;
  store.set(KEYS.name, name || null);
  ui.nameInput.blur();
  client.reconnect(); // the name is part of the handshake
});

// -- panels on narrow screens ----------------------------------------------------

const narrow = window.matchMedia("(max-width: 1000px)");

function closePanels() {
  ui.chat.classList.remove("rooms-open", "members-open");
  if (ui.scrim) ui.scrim.hidden = true;
  ui.membersToggle.setAttribute("aria-expanded", String(!narrow.matches && !ui.chat.classList.contains("members-collapsed")));
  if (ui.roomsToggle) ui.roomsToggle.setAttribute("aria-expanded", "false");
}

ui.membersToggle.addEventListener("click", () => {
  if (narrow.matches) {
    const open = !ui.chat.classList.contains("members-open");
    closePanels();
    ui.chat.classList.toggle("members-open", open);
    ui.scrim.hidden = !open;
    ui.membersToggle.setAttribute("aria-expanded", String(open));
  } else {
    const collapsed = ui.chat.classList.toggle("members-collapsed");
    ui.membersToggle.setAttribute("aria-expanded", String(!collapsed));
  }
});

if (ui.roomsToggle) {
  ui.roomsToggle.addEventListener("click", () => {
    const open = !ui.chat.classList.contains("rooms-open");
    closePanels();
    ui.chat.classList.toggle("rooms-open", open);
    ui.scrim.hidden = !open;
    ui.roomsToggle.setAttribute("aria-expanded", String(open));
  });
}
if (ui.scrim) ui.scrim.addEventListener("click", closePanels);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") closePanels();
});
narrow.addEventListener("change", closePanels);

// -- title and visibility ------------------------------------------------------

function updateTitle() {
  let total = 0;
  for (const room of rooms.values()) total += room.unread;
  const base = active ? `#${active.name} · Chat · Realtime` : "Chat · Realtime";
  document.title = total ? `(${total}) ${base}` : base;
  let others = 0;
  for (const room of rooms.values()) if (room !== active) others += room.unread;
  ui.roomsBadge.textContent = others > 99 ? "99+" : String(others);
  ui.roomsBadge.hidden = others === 0;
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && active && active.unread) {
    active.unread = 0;
    renderRooms();
    updateTitle();
  }
});

window.addEventListener("hashchange", () => {
  const { name } = cleanRoom(decodeURIComponent(location.hash.slice(1)));
  if (name) addRoom(name);
});

// -- start -----------------------------------------------------------------------

function start() {
  const saved = store.get(KEYS.rooms, null);
  const names = (Array.isArray(saved) && saved.length ? saved : ["lobby"]).filter((n) => typeof n === "string" && ROOM_RE.test(n));
  for (const name of names.length ? names : ["lobby"]) rooms.set(name, new Room(name));
  const fromHash = cleanRoom(decodeURIComponent(location.hash.slice(1))).name;
  if (fromHash && !rooms.has(fromHash)) rooms.set(fromHash, new Room(fromHash));
  saveRooms();
  restoreOutbox();
  const first = rooms.get(fromHash) || rooms.get(store.get(KEYS.active, "")) || rooms.values().next().value;
  renderMe();
  setActive(first);
  client.connect();
  bindStatus(client, document.getElementById("conn-state"));
  if (!narrow.matches) ui.text.focus();
}

start();
