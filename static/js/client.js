/**
 * The shared reconnecting WebSocket client used by every page (chat, dashboard, editing).
 *
 *   import { RealtimeClient, bindStatus } from "./client.js";
 *
 *   const client = new RealtimeClient("/ws/chat", {
 *     params: () => ({ name: localStorage.getItem("name") }), // query string, re-read on every attempt
 *     onOpen: (welcome) => {},       // the server's `welcome` message; (re)subscribe here
 *     onMessage: (msg) => {},        // every other message, already JSON-decoded
 *     onState: (state, detail) => {},
 *     refreshToken: async () => "…", // optional: a fresh token (see "Tokens" below)
 *   });
 *   bindStatus(client, document.getElementById("conn-state"));
 *   client.connect();
 *   client.send({ type: "join", room: "lobby" });   // -> false when the socket is not open
 *
 * States (`client.state`):
 *   "connecting"    first attempt, never been open yet
 *   "open"          connected and welcomed (with {welcome: false}: the socket is open)
 *   "reconnecting"  dropped; detail.retryAt is when the next attempt starts (null: trying now)
 *   "offline"       the browser says it is offline; retries when it comes back online
 *   "closed"        close() was called, or the server refused us for good (detail.fatal)
 * `detail` is {code, reason, message, retryAt, attempt, fatal}; `message` is a sentence a
 * person can read.
 *
 * Reconnection: exponential backoff with full jitter (random in [0, min(cap, base * 2^n)]),
 * 0.5 s base and 15 s cap by default; n resets once a connection has stayed up for
 * `stableAfter` ms, so a flapping server is not hammered.  A socket that is down is retried
 * at once when the browser comes back online or the tab becomes visible.
 *
 * Close codes (the server's table, docs/PROTOCOL.md):
 *   1001 going away, 1006 dropped, 1011 server fault, 1013 try again later  -> reconnect
 *   4001 token expired or invalid -> get a fresh token and reconnect; with no way to get one, stop
 *   4003 forbidden      -> stop (state "closed", detail.fatal), say why
 *   1008 policy (e.g. flooding) -> pause for `policyDelay` (60 s), then try again
 * Every socket asks for `close_codes=1`: a refused handshake (bad token, wrong key) then
 * arrives as a close with 4001/4003 instead of an HTTP status the browser hides (as 1006).
 *
 * Tokens: the token is `options.token`, else the page's own `?token=`, and goes in the
 * socket URL.  A way to get a fresh one is `options.refreshToken`, else a page-wide
 * `window.realtimeRefreshToken`: an (async) function returning the new token.  When the
 * server says `token_expiring`, the client asks it for a token and sends
 * {"type":"refresh","token":...} on the open socket; on close 4001 it asks again and
 * reconnects with the new one.  With neither, a 4001 stops the client ("Your session expired").
 *
 * Other options: `welcome` (default true: wait for a {"type":"welcome"} message before "open";
 * false: "open" as soon as the socket is), `heartbeat` (ms; 0 = off: send {"type":"ping"} when
 * the socket has been quiet this long and drop it if nothing arrives within `heartbeatTimeout`
 * -- catches half-open TCP connections the browser would otherwise notice only much later),
 * `baseDelay`, `maxDelay`, `stableAfter`, `connectTimeout`, `policyDelay`.
 *
 * Listeners: besides the option callbacks, `client.on("open" | "message" | "state", fn)`
 * adds more and returns a function that removes it.
 */

const DEFAULTS = {
  params: null,
  token: null,
  onOpen: null,
  onMessage: null,
  onState: null,
  refreshToken: null,
  welcome: true,
  heartbeat: 0,
  heartbeatTimeout: 10000,
  baseDelay: 500,
  maxDelay: 15000,
  stableAfter: 5000,
  connectTimeout: 10000,
  policyDelay: 60000,
};

/** What each close code means for the person, and whether to try again. */
function describeClose(code, reason) {
  const why = reason ? ` (${reason})` : "";
  switch (code) {
    case 1000:
      return "The server closed the connection" + why;
    case 1001:
      return "The server is restarting" + why;
    case 1006:
      return "The connection was lost";
    case 1008:
      return "Disconnected by the server" + (reason ? `: ${reason}` : "");
    case 1009:
      return "A message was too large for the server" + why;
    case 1011:
      return "The server had a problem" + why;
    case 1013:
      return "The server asked us to come back shortly" + why;
    case 4001:
      return "Your session expired" + why;
    case 4003:
      return "Access denied" + (reason ? `: ${reason}` : "");
    default:
      return "Disconnected" + why;
  }
}

/** The `?token=` this page was opened with, if any. */
function pageToken() {
  try {
    return new URLSearchParams(window.location.search).get("token");
  } catch (e) {
    return null;
  }
}

/** The ws:// or wss:// URL of `path` on this page's host, with `params` as the query. */
export function socketURL(path, params) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (params) {
    for (const [key, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, String(value));
    }
  }
  return url.toString();
}

export class RealtimeClient {
  constructor(path, options = {}) {
    this.path = path;
    this.options = { ...DEFAULTS, ...options };
    this.state = "idle";
    this.detail = {};
    this.welcome = null; // the last welcome message
    this.ws = null;
    this.attempt = 0; // consecutive failed attempts (drives the backoff)
    this.everOpen = false;
    this.token = this.options.token || pageToken();
    this._stopped = true;
    this._timers = {};
    this._listeners = { open: new Set(), message: new Set(), state: new Set() };
    this._onOnline = () => this._wake("online");
    this._onOffline = () => {
      if (this.state !== "open" && this.state !== "closed" && !this._stopped) {
        // Wait for "online"; retry slowly anyway in case the browser is wrong.
        this._setTimer("retry", this.options.maxDelay, () => this._open());
        this._setState("offline", { ...this.detail, retryAt: null, message: "You are offline" });
      }
    };
    this._onVisible = () => {
      if (document.visibilityState === "visible") this._wake("visible");
    };
  }

  // -- public API ------------------------------------------------------------

  /** Start (or restart after close()) connecting; idempotent while running. */
  connect() {
    if (!this._stopped) return this;
    this._stopped = false;
    window.addEventListener("online", this._onOnline);
    window.addEventListener("offline", this._onOffline);
    document.addEventListener("visibilitychange", this._onVisible);
    this._open();
    return this;
  }

  /** Send one message as JSON.  False (and nothing sent) when the socket is not open. */
  send(obj) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    try {
      ws.send(JSON.stringify(obj));
      return true;
    } catch (e) {
      return false;
    }
  }

  /** Close for good (until connect() is called again). */
  close(code = 1000, reason = "") {
    this._stopped = true;
    window.removeEventListener("online", this._onOnline);
    window.removeEventListener("offline", this._onOffline);
    document.removeEventListener("visibilitychange", this._onVisible);
    this._drop(code, reason);
    this._setState("closed", { code, reason, message: "Disconnected" });
  }

  /** Drop the current socket (if any) and connect again now, e.g. after params changed. */
  reconnect() {
    if (this._stopped) return this.connect();
    this._drop(1000, "reconnecting");
    this.attempt = 0;
    this._setState(this.everOpen ? "reconnecting" : "connecting", { retryAt: null, message: "Reconnecting…" });
    this._open();
    return this;
  }

  /** Skip the rest of the backoff wait (e.g. a "retry now" button). */
  retryNow() {
    if (this._stopped) return this.connect();
    if (this.state === "reconnecting" || this.state === "offline") {
      this._clearTimer("retry");
      this._open();
    }
    return this;
  }

  /** Add a listener for "open", "message" or "state"; returns the function that removes it. */
  on(event, fn) {
    const set = this._listeners[event];
    if (!set) throw new Error(`unknown event ${event}`);
    set.add(fn);
    return () => set.delete(fn);
  }

  // -- internals -------------------------------------------------------------

  _emit(event, ...args) {
    const own = { open: this.options.onOpen, message: this.options.onMessage, state: this.options.onState }[event];
    for (const fn of own ? [own, ...this._listeners[event]] : this._listeners[event]) {
      try {
        fn(...args);
      } catch (e) {
        console.error(`RealtimeClient ${event} handler failed`, e);
      }
    }
  }

  _setState(state, detail = {}) {
    this.state = state;
    this.detail = { attempt: this.attempt, ...detail };
    this._emit("state", state, this.detail);
  }

  _setTimer(name, ms, fn) {
    this._clearTimer(name);
    this._timers[name] = setTimeout(() => {
      delete this._timers[name];
      fn();
    }, ms);
  }

  _clearTimer(name) {
    if (this._timers[name] !== undefined) {
      clearTimeout(this._timers[name]);
      delete this._timers[name];
    }
  }

  _wake(why) {
    if (this._stopped || this.state === "closed") return;
    const down = !this.ws || this.ws.readyState === WebSocket.CLOSED || this.ws.readyState === WebSocket.CLOSING;
    if (down && (this.state === "reconnecting" || this.state === "offline")) {
      this._clearTimer("retry");
      this._open();
    } else if (why === "visible" && this.state === "open" && this.options.heartbeat) {
      // Timers are throttled in background tabs: check the socket is still alive now.
      this._ping();
    }
  }

  _open() {
    if (this._stopped) return;
    this._clearTimer("retry");
    let url;
    try {
      const params = { close_codes: 1, ...(this.options.params ? this.options.params() : {}) };
      if (this.token && params.token === undefined) params.token = this.token;
      url = socketURL(this.path, params);
    } catch (e) {
      console.error("RealtimeClient: params() failed", e);
      this._scheduleRetry({ message: "Could not build the connection address" });
      return;
    }
    if (this.state !== "reconnecting" && this.state !== "connecting") {
      this._setState(this.everOpen ? "reconnecting" : "connecting", { retryAt: null, message: "Connecting…" });
    } else if (this.detail.retryAt) {
      this._setState(this.state, { ...this.detail, retryAt: null });
    }
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      this._scheduleRetry({ message: "Could not open a connection" });
      return;
    }
    this.ws = ws;
    this._welcomed = false;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      if (!this.options.welcome) this._opened(null);
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      this._lastRx = Date.now();
      this._armHeartbeat();
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (e) {
        console.warn("RealtimeClient: not JSON", ev.data);
        return;
      }
      if (!this._welcomed && this.options.welcome && msg && msg.type === "welcome") {
        this._opened(msg);
        return;
      }
      if (msg && msg.type === "pong" && msg.ref === "hb") return; // our own heartbeat
      if (msg && msg.type === "token_expiring") this._refreshInPlace(ws);
      this._emit("message", msg);
    };
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this._closed(ev.code, ev.reason);
    };
    ws.onerror = () => {}; // always followed by close, which carries the code
    // A handshake that hangs (or a server that never says welcome) counts as a failure.
    this._setTimer("connect", this.options.connectTimeout, () => {
      if (ws === this.ws && !this._welcomed) {
        this._drop(4000, "connect timeout");
        this._closed(1006, "timed out");
      }
    });
  }

  _opened(welcome) {
    this._clearTimer("connect");
    this._welcomed = true;
    this.welcome = welcome;
    this.everOpen = true;
    this._setTimer("stable", this.options.stableAfter, () => {
      this.attempt = 0;
    });
    this._lastRx = Date.now();
    this._armHeartbeat();
    this._setState("open", { message: "Connected" });
    this._emit("open", welcome);
  }

  _armHeartbeat() {
    const hb = this.options.heartbeat;
    if (!hb) return;
    this._clearTimer("pong");
    this._setTimer("heartbeat", hb, () => this._ping());
  }

  _ping() {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    this.send({ type: "ping", ref: "hb" });
    const ws = this.ws;
    this._setTimer("pong", this.options.heartbeatTimeout, () => {
      if (ws === this.ws) {
        this._drop(4000, "no answer to ping");
        this._closed(1006, "no answer to ping");
      }
    });
  }

  /** Forget the current socket: detach its handlers and close it (without waiting). */
  _drop(code, reason) {
    for (const name of ["connect", "heartbeat", "pong", "stable", "retry"]) this._clearTimer(name);
    const ws = this.ws;
    this.ws = null;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) {
        ws.close(code === 1000 || (code >= 3000 && code <= 4999) ? code : 1000, reason);
      }
    } catch (e) {
      /* already closing */
    }
  }

  async _closed(code, reason) {
    for (const name of ["connect", "heartbeat", "pong", "stable"]) this._clearTimer(name);
    this.ws = null;
    const wasOpen = this._welcomed;
    this._welcomed = false;
    if (this._stopped) {
      this._setState("closed", { code, reason, message: "Disconnected" });
      return;
    }
    const message = describeClose(code, reason);
    if (code === 4003) {
      this._stopped = true;
      this._setState("closed", { code, reason, fatal: true, message });
      return;
    }
    if (code === 1008) {
      this._scheduleRetry({ code, reason, message, delay: this.options.policyDelay });
      return;
    }
    if (code === 4001) {
      if (!this._refresher()) {
        // No way to get another token: retrying with this one would be refused forever.
        this._stopped = true;
        this._setState("closed", { code, reason, fatal: true, message });
        return;
      }
      this._setState("reconnecting", { code, reason, retryAt: null, message: "Refreshing your session…" });
      try {
        await this._freshToken();
      } catch (e) {
        console.warn("RealtimeClient: refreshToken failed", e);
        this._scheduleRetry({ code, reason, message });
        return;
      }
      if (!this._stopped) this._open();
      return;
    }
    if (code === 1001 && wasOpen) this.attempt = 0; // a clean restart: come back quickly
    this._scheduleRetry({ code, reason, message });
  }

  /** The page's way to get a fresh token, or null. */
  _refresher() {
    const own = this.options.refreshToken;
    if (own) return own;
    return typeof window.realtimeRefreshToken === "function" ? window.realtimeRefreshToken : null;
  }

  /** Ask for a fresh token and keep it for the next connection; resolves to it (or null). */
  async _freshToken() {
    const fn = this._refresher();
    if (!fn) return null;
    const token = await fn();
    if (typeof token === "string" && token) this.token = token;
    return typeof token === "string" && token ? token : null;
  }

  /** token_expiring: send a fresh token on this socket before the server closes it at exp. */
  async _refreshInPlace(ws) {
    let token;
    try {
      token = await this._freshToken();
    } catch (e) {
      console.warn("RealtimeClient: refreshToken failed", e);
      return;
    }
    if (token && ws === this.ws) this.send({ type: "refresh", token, ref: "token" });
  }

  _scheduleRetry(detail) {
    if (this._stopped) return;
    let delay = detail.delay;
    if (delay === undefined) {
      const cap = Math.min(this.options.maxDelay, this.options.baseDelay * 2 ** this.attempt);
      delay = Math.max(100, Math.random() * cap);
      this.attempt += 1;
    }
    delete detail.delay;
    if (typeof navigator !== "undefined" && navigator.onLine === false) {
      // Wait for the "online" event; retry slowly anyway in case the browser is wrong.
      this._setTimer("retry", this.options.maxDelay, () => this._open());
      this._setState("offline", { ...detail, retryAt: null, message: "You are offline" });
      return;
    }
    const retryAt = Date.now() + delay;
    this._setTimer("retry", delay, () => this._open());
    this._setState(this.everOpen ? "reconnecting" : "connecting", { ...detail, retryAt });
  }
}

const LABELS = {
  idle: "Not connected",
  connecting: "Connecting…",
  open: "Connected",
  offline: "Offline",
  closed: "Disconnected",
};

/**
 * Show `client`'s state in `element` (the topbar's #conn-state): its text, its
 * `data-state` (for the pill colour) and a tooltip with the reason.  While a retry is
 * scheduled it counts down ("Reconnecting in 3s"); a click retries at once.
 * Returns a function that unbinds.
 */
export function bindStatus(client, element) {
  if (!element) return () => {};
  let ticker = null;
  const render = () => {
    const { state, detail } = client;
    let text = LABELS[state] || state;
    if (state === "reconnecting" || (state === "connecting" && detail.retryAt)) {
      const secs = detail.retryAt ? Math.ceil((detail.retryAt - Date.now()) / 1000) : 0;
      text = secs > 0 ? `Reconnecting in ${secs}s` : "Reconnecting…";
    }
    // The countdown sits in its own span so narrow layouts can hide it (.conn-detail).
    const label = document.createElement("span");
    const m = /^(Reconnecting)( in \d+s)$/.exec(text);
    if (m) {
      const extra = document.createElement("span");
      extra.className = "conn-detail";
      extra.textContent = m[2];
      label.append(m[1], extra);
    } else {
      label.textContent = text;
    }
    element.replaceChildren(label);
    element.dataset.state = state;
    element.title = detail.message && detail.message !== text ? `${detail.message}. ${text}` : text;
    element.hidden = false;
    const canRetry = state === "reconnecting" || state === "offline" || (state === "closed" && !detail.fatal);
    element.classList.toggle("is-actionable", canRetry);
    if (canRetry) element.setAttribute("aria-label", `${text}. Click to retry now.`);
    else element.removeAttribute("aria-label");
  };
  const onState = () => {
    render();
    const counting = client.detail.retryAt && client.detail.retryAt > Date.now();
    if (counting && !ticker) ticker = setInterval(render, 250);
    if (!counting && ticker) {
      clearInterval(ticker);
      ticker = null;
    }
  };
  const onClick = () => {
    if (element.classList.contains("is-actionable")) client.retryNow();
  };
  element.addEventListener("click", onClick);
  const off = client.on("state", onState);
  onState();
  return () => {
    off();
    element.removeEventListener("click", onClick);
    if (ticker) clearInterval(ticker);
  };
}
