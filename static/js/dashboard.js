/**
 * The live sensor dashboard: one card per watched sensor with its latest value, a canvas
 * chart (chart.js) and min / mean / max over the window.
 *
 * Protocol (docs/PROTOCOL.md, /ws/sensors):
 * - `welcome` lists the sensors; on every (re)connect the page subscribes to its selection
 *   with `backfill` = the chart window, so charts start full and reconnects leave no hole.
 * - `backfill` replaces a chart's points; `readings` appends batches (at most `max_hz` a
 *   second), each with the server time `ts`, used to keep the charts' clock on the
 *   server's even if this machine's clock is off.
 * - `sensor_added` / `sensor_updated` / `sensor_removed` keep the grid in step.
 *
 * Choices (sensors, rate, window) live in localStorage.  Everything the server sends is
 * put in the page with textContent, never as HTML.
 */

import { RealtimeClient, bindStatus } from "./client.js";
import { LineChart, formatValue, startRenderLoop } from "./chart.js";
import { $, h, store } from "./dom.js";

const KEYS = { selection: "rt.dash.selection", rate: "rt.dash.rate", window: "rt.dash.window" };
const RATES = [1, 2, 5, 10];
const WINDOWS = [60, 300, 600];
const KIND_ORDER = { simulated: 0, host: 1, device: 2 };
const KIND_LABEL = { simulated: "Simulated", host: "This server", device: "Devices" };
const KIND_SHORT = { simulated: "sim", host: "host", device: "device" };
const SERIES = 6;

// -- helpers ---------------------------------------------------------------------


// Colours go round the palette in the order sensors first appear (the server's order, so a
// reload gives the same colours); a sensor keeps its colour for the life of the page.
const seriesIndex = new Map();
function seriesOf(id) {
  let i = seriesIndex.get(id);
  if (i === undefined) {
    i = seriesIndex.size % SERIES;
    seriesIndex.set(id, i);
  }
  return i;
}

function cssVar(name, fallback) {
  const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return v || fallback;
}

/** A reading for people: 4 significant digits, SI prefixes past 10 000 (1.235M). */
function formatReading(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a >= 10000) return formatValue(v, a / 1000, a);
  if (a === 0) return "0";
  const decimals = Math.min(4, Math.max(0, 3 - Math.floor(Math.log10(a))));
  const text = v.toFixed(decimals);
  // 4.800 reads as false precision: drop trailing zeros (4.8), keep integers as they are.
  return decimals ? text.replace(/\.?0+$/, "") : text;
}

function formatAge(seconds) {
  if (seconds < 1.5) return "now";
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

function formatRate(hz) {
  if (hz >= 1) return `${+hz.toFixed(1)} Hz`;
  return `every ${Math.round(1 / hz)} s`;
}

function formatWindow(s) {
  return s >= 60 ? `${Math.round(s / 60)} min` : `${s} s`;
}

// -- state -----------------------------------------------------------------------

const ui = {
  dash: $("dash"),
  sub: $("dash-sub"),
  grid: $("grid"),
  empty: $("empty"),
  emptyAll: $("empty-all"),
  notices: $("notices"),
  statStreams: $("stat-streams"),
  statRate: $("stat-rate"),
  statPoints: $("stat-points"),
  statAge: $("stat-age"),
  pickerToggle: $("picker-toggle"),
  pickerPanel: $("picker-panel"),
  pickerFilter: $("picker-filter"),
  pickerList: $("picker-list"),
  pickerCount: $("picker-count"),
  pickerAll: $("picker-all"),
  pickerNone: $("picker-none"),
  pause: $("pause"),
  pauseLabel: $("pause-label"),
  pausedBanner: $("paused-banner"),
  resume: $("resume"),
  pushOpen: $("push-open"),
  pushDialog: $("push-dialog"),
};

const sensors = new Map(); // id -> Sensor (every sensor the server has)
const charts = new Set(); // the charts on screen, for the render loop
let selection = normaliseSelection(store.get(KEYS.selection, { mode: "all" }));
let rateHz = RATES.includes(store.get(KEYS.rate, 10)) ? store.get(KEYS.rate, 10) : 10;
let windowS = WINDOWS.includes(store.get(KEYS.window, 60)) ? store.get(KEYS.window, 60) : 60;
let maxWindow = 600;
let paused = false;
let clockOffset = null; // seconds: this machine's clock minus the server's (plus the fastest delivery)
const offsets = []; // recent (receive time - ts) samples
let lastMessageAt = 0; // performance.now() of the last readings message
const arrivals = []; // [performance.now(), points] of recent readings messages

function normaliseSelection(sel) {
  if (sel && sel.mode === "some" && Array.isArray(sel.ids)) {
    return { mode: "some", ids: sel.ids.filter((x) => typeof x === "string").slice(0, 500) };
  }
  return { mode: "all" };
}

function isSelected(id) {
  return selection.mode === "all" || selection.ids.includes(id);
}

function saveSelection() {
  store.set(KEYS.selection, selection);
}

/** Server time now, in unix seconds, as best this page knows it. */
function serverNow() {
  return Date.now() / 1000 - (clockOffset ?? 0);
}

// -- one sensor ---------------------------------------------------------------------

class Sensor {
  constructor(info) {
    this.info = info;
    seriesOf(info.id); // take the next colour now, in the server's order
    this.card = null;
    this.chart = null;
    this.latest = null; // [t, v]
    this.receivedAt = 0; // performance.now() of its last point
    this.t = []; // our own copy of the window, for min / mean / max
    this.v = [];
  }

  get id() {
    return this.info.id;
  }

  staleAfter() {
    return Math.max(5, 3 / (this.info.rate_hz || 1));
  }

  setPoints(points) {
    this.t = [];
    this.v = [];
    this.latest = null;
    if (this.chart) this.chart.clear();
    this.addPoints(points);
  }

  addPoints(points) {
    if (!points.length) return;
    for (const [t, v] of points) {
      this.t.push(t);
      this.v.push(v);
    }
    const last = points[points.length - 1];
    if (!this.latest || last[0] >= this.latest[0]) this.latest = last;
    this.receivedAt = performance.now();
    if (this.chart) this.chart.addPoints(points);
    if (!paused) this.renderValue();
  }

  trim(cutoff) {
    let i = 0;
    while (i < this.t.length && this.t[i] < cutoff) i++;
    if (i > 0) {
      this.t.splice(0, i);
      this.v.splice(0, i);
    }
  }

  mount(grid) {
    if (this.card) return;
    const info = this.info;
    const series = seriesOf(info.id);
    const card = h("article", `sensor-card series-${series + 1}`);
    card.dataset.sensor = info.id;
    card.dataset.kind = info.kind;
    card.dataset.stale = "false";

    const head = h("header", "sensor-head");
    const dot = h("span", "sensor-dot");
    dot.setAttribute("aria-hidden", "true");
    const title = h("div", "sensor-title");
    this.labelEl = h("h2", "sensor-label", info.label);
    this.labelEl.title = info.label;
    const idEl = h("code", "sensor-id", info.id);
    title.append(this.labelEl, idEl);
    const kind = h("span", `pill sensor-kind kind-${info.kind}`, KIND_SHORT[info.kind] || info.kind);
    head.append(dot, title, kind);

    const reading = h("div", "sensor-reading");
    this.valueEl = h("span", "sensor-value", "–");
    this.unitEl = h("span", "sensor-unit", info.unit);
    this.ageEl = h("span", "sensor-age muted", "");
    reading.append(this.valueEl, this.unitEl, this.ageEl);
    reading.setAttribute("aria-live", "off");

    const canvas = h("canvas", "sensor-chart");
    canvas.setAttribute("aria-label", `${info.label} over the last ${formatWindow(windowS)}`);

    const foot = h("footer", "sensor-foot");
    this.minEl = h("span", null, "min –");
    this.meanEl = h("span", null, "mean –");
    this.maxEl = h("span", null, "max –");
    this.rateEl = h("span", "sensor-rate", formatRate(info.rate_hz));
    foot.append(this.minEl, this.meanEl, this.maxEl, this.rateEl);

    card.append(head, reading, canvas, foot);
    this.card = card;
    grid.append(card);
    this.chart = new LineChart(canvas, {
      windowSeconds: windowS,
      color: cssVar(`--series-${series + 1}`, "#4f46e5"),
      textColor: cssVar("--faint", "#8a92a3"),
      gridColor: cssVar("--chart-grid", "rgba(128,128,128,0.18)"),
      lineWidth: 1.6,
      unit: "",
      gapSeconds: info.kind === "device" ? null : Math.max(2, 5 / (info.rate_hz || 1)),
    });
    if (this.t.length) this.chart.addPoints(this.t.map((t, i) => [t, this.v[i]]));
    if (paused) this.chart.pause(serverNow());
    charts.add(this.chart);
    this.renderValue();
  }

  unmount() {
    if (!this.card) return;
    charts.delete(this.chart);
    this.chart.destroy();
    this.card.remove();
    this.card = this.chart = null;
  }

  update(info) {
    this.info = info;
    if (!this.card) return;
    this.labelEl.textContent = info.label;
    this.labelEl.title = info.label;
    this.unitEl.textContent = info.unit;
    this.rateEl.textContent = formatRate(info.rate_hz);
  }

  renderValue() {
    if (!this.card) return;
    this.valueEl.textContent = this.latest ? formatReading(this.latest[1]) : "–";
  }

  renderStats(now) {
    if (!this.card) return;
    this.trim(now - windowS);
    const n = this.v.length;
    if (n) {
      let lo = Infinity;
      let hi = -Infinity;
      let sum = 0;
      for (let i = 0; i < n; i++) {
        const x = this.v[i];
        if (x < lo) lo = x;
        if (x > hi) hi = x;
        sum += x;
      }
      this.minEl.textContent = `min ${formatReading(lo)}`;
      this.meanEl.textContent = `mean ${formatReading(sum / n)}`;
      this.maxEl.textContent = `max ${formatReading(hi)}`;
    }
    const age = this.receivedAt ? (performance.now() - this.receivedAt) / 1000 : Infinity;
    const stale = !this.latest || age > this.staleAfter();
    this.card.dataset.stale = String(stale);
    this.ageEl.textContent = !this.latest ? "no data yet" : stale ? `no data for ${formatAge(age).replace(" ago", "")}` : "";
  }
}

// -- the grid ---------------------------------------------------------------------------

function ordered() {
  return [...sensors.values()].sort(
    (a, b) => (KIND_ORDER[a.info.kind] ?? 9) - (KIND_ORDER[b.info.kind] ?? 9)
  );
}

function layout() {
  // Cards in kind order (simulated, host, devices), each group in server order.
  let shown = 0;
  for (const s of ordered()) {
    if (isSelected(s.id)) {
      s.mount(ui.grid);
      ui.grid.append(s.card); // moves it into place
      shown++;
    } else {
      s.unmount();
    }
  }
  ui.empty.hidden = shown > 0 || sensors.size === 0;
  ui.pickerCount.textContent = selection.mode === "all" ? `${sensors.size}` : `${shown}/${sensors.size}`;
  renderPicker();
  renderSummary();
}

function renderSummary() {
  const counts = { simulated: 0, host: 0, device: 0 };
  for (const s of sensors.values()) counts[s.info.kind] = (counts[s.info.kind] || 0) + 1;
  const parts = [];
  if (counts.simulated) parts.push(`${counts.simulated} simulated`);
  if (counts.host) parts.push(`${counts.host} from this server`);
  parts.push(counts.device === 1 ? "1 device" : `${counts.device} devices`);
  ui.sub.textContent = `${parts.join(" · ")} · ${formatWindow(windowS)} window at up to ${rateHz} Hz`;
  const watching = [...sensors.values()].filter((s) => s.card).length;
  ui.statStreams.textContent = `${watching}/${sensors.size}`;
}

function renderPicker() {
  const filter = ui.pickerFilter.value.trim().toLowerCase();
  const list = ui.pickerList;
  list.replaceChildren();
  let lastKind = null;
  let any = false;
  for (const s of ordered()) {
    const info = s.info;
    const hay = `${info.label} ${info.id} ${info.unit}`.toLowerCase();
    if (filter && !hay.includes(filter)) continue;
    if (info.kind !== lastKind) {
      lastKind = info.kind;
      list.append(h("p", "picker-group", KIND_LABEL[info.kind] || info.kind));
    }
    const row = h("label", `picker-item series-${seriesOf(info.id) + 1}`);
    const box = h("input");
    box.type = "checkbox";
    box.checked = isSelected(info.id);
    box.dataset.sensor = info.id;
    const dot = h("span", "sensor-dot");
    const text = h("span", "picker-text");
    text.append(h("span", "picker-label", info.label), h("code", "picker-id", info.id));
    const unit = h("span", "picker-unit muted", info.unit);
    row.append(box, dot, text, unit);
    list.append(row);
    any = true;
  }
  if (!any) list.append(h("p", "picker-none muted", filter ? "No sensor matches." : "No sensors yet."));
}

// -- the connection -----------------------------------------------------------------------

const client = new RealtimeClient("/ws/sensors", {
  onOpen: onWelcome,
  onMessage: onMessage,
  onState: (state) => {
    ui.dash.dataset.conn = state;
    if (state !== "open") ui.grid.setAttribute("aria-busy", "true");
  },
  heartbeat: 15000,
});

function subscribeMessage(backfill) {
  const names = selection.mode === "all" ? ["*"] : selection.ids.filter((id) => sensors.has(id));
  return { type: "subscribe", sensors: names, max_hz: rateHz, backfill };
}

function onWelcome(welcome) {
  ui.dash.dataset.ready = "false"; // until the backfill of this connection is in
  const limits = welcome.limits || {};
  maxWindow = limits.window || 600;
  for (const input of document.querySelectorAll('input[name="window"]')) {
    input.disabled = Number(input.value) > maxWindow;
  }
  if (windowS > maxWindow) setWindow(WINDOWS.filter((w) => w <= maxWindow).pop() || 60, false);
  const seen = new Set();
  for (const info of welcome.sensors || []) {
    seen.add(info.id);
    const s = sensors.get(info.id);
    if (s) s.update(info);
    else sensors.set(info.id, new Sensor(info));
  }
  for (const [id, s] of sensors) {
    if (!seen.has(id)) {
      s.unmount();
      sensors.delete(id);
    }
  }
  offsets.length = 0;
  clockOffset = typeof welcome.server_time === "number" ? Date.now() / 1000 - welcome.server_time : null;
  layout();
  client.send(subscribeMessage(windowS));
}

function onMessage(msg) {
  switch (msg.type) {
    case "readings":
      onReadings(msg);
      break;
    case "backfill": {
      const s = sensors.get(msg.sensor);
      if (s) s.setPoints(msg.points || []);
      ui.dash.dataset.ready = "true";
      ui.grid.setAttribute("aria-busy", "false");
      break;
    }
    case "subscribed":
      ui.grid.setAttribute("aria-busy", "false");
      if (!msg.sensors || !msg.sensors.length) ui.dash.dataset.ready = "true"; // nothing to backfill
      if (msg.max_hz && msg.max_hz < rateHz) notify(`The server caps updates at ${msg.max_hz} Hz.`, "info");
      break;
    case "sensor_added": {
      const info = msg.sensor;
      if (!sensors.has(info.id)) sensors.set(info.id, new Sensor(info));
      layout();
      const card = sensors.get(info.id).card;
      if (card) {
        card.classList.add("is-new");
        setTimeout(() => card.classList.remove("is-new"), 2500);
      }
      break;
    }
    case "sensor_updated": {
      const s = sensors.get(msg.sensor.id);
      if (s) s.update(msg.sensor);
      renderPicker();
      break;
    }
    case "sensor_removed": {
      const s = sensors.get(msg.sensor);
      if (s) {
        s.unmount();
        sensors.delete(msg.sensor);
        if (selection.mode === "some") selection.ids = selection.ids.filter((id) => id !== msg.sensor);
        layout();
        notify(`Sensor ${msg.sensor} was ${msg.reason === "expired" ? "removed after going silent" : "removed"}.`,
          "info");
      }
      break;
    }
    case "error":
      notify(msg.message || "The server refused a request.", "error");
      break;
    default:
      break;
  }
}

function onReadings(msg) {
  const nowMs = performance.now();
  let n = 0;
  for (const [id, points] of Object.entries(msg.points || {})) {
    const s = sensors.get(id);
    if (!s) continue;
    s.addPoints(points);
    n += points.length;
  }
  lastMessageAt = nowMs;
  arrivals.push([nowMs, n]);
  if (typeof msg.ts === "number") {
    // The smallest (receive time - send time) seen lately is the clock difference plus the
    // fastest delivery: the charts then run on the server's clock, a few ms behind.
    offsets.push(Date.now() / 1000 - msg.ts);
    if (offsets.length > 100) offsets.shift();
    clockOffset = Math.min(...offsets);
  }
}

// -- controls -------------------------------------------------------------------------------

function notify(text, kind = "info") {
  const node = h("div", `notice notice-${kind} notice-subtle`);
  node.append(h("span", "notice-text", text));
  const close = h("button", "notice-close", "×");
  close.type = "button";
  close.setAttribute("aria-label", "Dismiss");
  close.addEventListener("click", () => node.remove());
  node.append(close);
  ui.notices.append(node);
  while (ui.notices.children.length > 3) ui.notices.firstElementChild.remove();
  setTimeout(() => node.remove(), 6000);
}

function setRate(hz, send = true) {
  rateHz = hz;
  store.set(KEYS.rate, hz);
  const input = $(`rate-${hz}`);
  if (input) input.checked = true;
  renderSummary();
  if (send) client.send({ type: "subscribe", sensors: [], max_hz: hz });
}

function setWindow(seconds, send = true) {
  const grew = seconds > windowS;
  windowS = seconds;
  store.set(KEYS.window, seconds);
  const input = $(`win-${seconds}`);
  if (input) input.checked = true;
  for (const s of sensors.values()) {
    if (s.chart) s.chart.windowSeconds = seconds;
  }
  renderSummary();
  // A longer window needs older points than the page has: ask for them.
  if (send && grew) client.send(subscribeMessage(seconds));
}

function setPaused(on) {
  paused = on;
  ui.dash.dataset.paused = String(on);
  ui.pause.setAttribute("aria-pressed", String(on));
  ui.pauseLabel.textContent = on ? "Resume" : "Pause";
  ui.pausedBanner.hidden = !on;
  const now = serverNow();
  for (const s of sensors.values()) {
    if (!s.chart) continue;
    if (on) s.chart.pause(now);
    else s.chart.resume();
    if (!on) s.renderValue();
  }
}

function select(id, on) {
  if (selection.mode === "all") {
    if (on) return;
    selection = { mode: "some", ids: [...sensors.keys()].filter((x) => x !== id) };
    client.send({ type: "unsubscribe", sensors: [id] });
  } else if (on) {
    if (!selection.ids.includes(id)) selection.ids.push(id);
    if (sensors.size && [...sensors.keys()].every((x) => selection.ids.includes(x))) {
      selection = { mode: "all" };
      client.send({ type: "subscribe", sensors: ["*"], max_hz: rateHz, backfill: 0 });
    }
    client.send({ type: "subscribe", sensors: [id], max_hz: rateHz, backfill: windowS });
  } else {
    selection.ids = selection.ids.filter((x) => x !== id);
    client.send({ type: "unsubscribe", sensors: [id] });
  }
  saveSelection();
  layout();
}

function selectAll() {
  selection = { mode: "all" };
  saveSelection();
  layout();
  client.send(subscribeMessage(windowS));
}

function selectNone() {
  selection = { mode: "some", ids: [] };
  saveSelection();
  client.send({ type: "unsubscribe", sensors: ["*"] });
  layout();
}

function openPicker(open) {
  ui.pickerPanel.hidden = !open;
  ui.pickerToggle.setAttribute("aria-expanded", String(open));
  if (open) {
    renderPicker();
    ui.pickerFilter.focus();
  }
}

function fillSnippets() {
  const origin = window.location.origin;
  const ws = origin.replace(/^http/, "ws");
  $("snippet-key").textContent = "export INGEST_KEY=$(cat data/ingest_key)   # or the value of --ingest_key";
  $("snippet-curl").textContent =
    `curl -X POST ${origin}/api/sensors/my.sensor/readings \\\n` +
    `  -H "Authorization: Bearer $INGEST_KEY" \\\n` +
    `  -d '21.5'\n\n` +
    `# a batch: [[t, value], ...] with t in unix seconds\n` +
    `curl -X POST ${origin}/api/sensors/my.sensor/readings \\\n` +
    `  -H "Authorization: Bearer $INGEST_KEY" \\\n` +
    `  -d "[[$(date +%s.%N), 21.7]]"`;
  $("snippet-meta").textContent =
    `curl -X PUT ${origin}/api/sensors/my.sensor \\\n` +
    `  -H "Authorization: Bearer $INGEST_KEY" \\\n` +
    `  -d '{"label": "Boiler temperature", "unit": "°C"}'`;
  $("snippet-ws").textContent =
    `websocat "${ws}/ws/sensors?key=$INGEST_KEY"\n` +
    `{"type":"publish","sensor":"my.sensor","points":[[${Math.floor(Date.now() / 1000)}.5, 22.1]],"ref":1}\n` +
    `# <- {"type":"ack","sensor":"my.sensor","stored":1,"ref":1}`;
}

async function copyFrom(button) {
  const text = $(button.dataset.copy).textContent;
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch (e) {
    const range = document.createRange(); // no clipboard permission: select it for Ctrl+C
    range.selectNodeContents($(button.dataset.copy));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }
  button.textContent = ok ? "Copied" : "Press Ctrl+C";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1600);
}

// -- stats, once a second --------------------------------------------------------------------

function tickStats() {
  const nowMs = performance.now();
  while (arrivals.length && nowMs - arrivals[0][0] > 5000) arrivals.shift();
  const span = Math.min(5, Math.max(1, (nowMs - (arrivals.length ? arrivals[0][0] : nowMs)) / 1000));
  const msgs = arrivals.length;
  const pts = arrivals.reduce((acc, a) => acc + a[1], 0);
  ui.statRate.textContent = client.state === "open" ? (msgs / span).toFixed(1) : "–";
  const pps = pts / span;
  ui.statPoints.textContent = client.state !== "open" ? "–" : pps >= 10 ? String(Math.round(pps)) : pps.toFixed(1);
  ui.statAge.textContent = lastMessageAt ? formatAge((nowMs - lastMessageAt) / 1000) : "–";
  const now = serverNow();
  for (const s of sensors.values()) s.renderStats(now);
}

function onThemeChange() {
  for (const s of sensors.values()) {
    if (!s.chart) continue;
    const o = s.chart.options;
    o.color = cssVar(`--series-${seriesOf(s.id) + 1}`, o.color);
    o.textColor = cssVar("--faint", o.textColor);
    o.gridColor = cssVar("--chart-grid", o.gridColor);
    s.chart.invalidate();
  }
}

// -- start ------------------------------------------------------------------------------------

function start() {
  setRate(rateHz, false);
  setWindow(windowS, false);
  for (const input of document.querySelectorAll('input[name="rate"]')) {
    input.addEventListener("change", () => setRate(Number(input.value)));
  }
  for (const input of document.querySelectorAll('input[name="window"]')) {
    input.addEventListener("change", () => setWindow(Number(input.value)));
  }
  ui.pause.addEventListener("click", () => setPaused(!paused));
  ui.resume.addEventListener("click", () => setPaused(false));
  ui.pickerToggle.addEventListener("click", () => openPicker(ui.pickerPanel.hidden));
  ui.pickerFilter.addEventListener("input", renderPicker);
  ui.pickerAll.addEventListener("click", selectAll);
  ui.pickerNone.addEventListener("click", selectNone);
  ui.emptyAll.addEventListener("click", selectAll);
  ui.pickerList.addEventListener("change", (ev) => {
    const box = ev.target;
    if (box && box.dataset && box.dataset.sensor) select(box.dataset.sensor, box.checked);
  });
  document.addEventListener("click", (ev) => {
    if (!ui.pickerPanel.hidden && !ev.target.closest(".picker")) openPicker(false);
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && !ui.pickerPanel.hidden) {
      openPicker(false);
      ui.pickerToggle.focus();
    }
    const typing = ev.target.closest && ev.target.closest("input, textarea, select, dialog");
    if (!typing && (ev.key === "p" || ev.key === "P") && !ev.ctrlKey && !ev.metaKey && !ev.altKey) {
      setPaused(!paused);
    }
  });
  ui.pushOpen.addEventListener("click", () => {
    fillSnippets();
    ui.pushDialog.showModal();
  });
  ui.pushDialog.addEventListener("click", (ev) => {
    if (ev.target === ui.pushDialog) ui.pushDialog.close(); // a click on the backdrop
  });
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", () => copyFrom(button));
  }
  if (window.matchMedia) {
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", onThemeChange);
  }
  bindStatus(client, $("conn-state"));
  startRenderLoop(charts, { clock: serverNow });
  setInterval(tickStats, 1000);
  client.connect();
}

start();
