// A canvas line chart for live sensor streams.  No libraries, no network.
//
//   import { LineChart, startRenderLoop } from "/static/js/chart.js";
//   const chart = new LineChart(canvas, { windowSeconds: 60, unit: "°C", color: "#d9480f" });
//   chart.addPoints([[1700000000.1, 21.4], [1700000000.2, 21.5]]);  // t = unix seconds
//   const charts = new Set([chart]);
//   const stop = startRenderLoop(charts);   // one requestAnimationFrame loop for every chart
//
// Cost model, so that 20 charts fed at 10 Hz stay smooth:
// * addPoints() only stores and marks the chart dirty; drawing happens once per frame at most,
//   and only for charts that changed or whose time axis has scrolled by a whole pixel.
// * Memory is bounded: points older than the window are dropped (kept while paused), and
//   never more than `maxPoints` are held.
// * When there are more points than pixels, each pixel column is drawn as first/min/max/last,
//   so drawing costs O(width), not O(points), and spikes stay visible.
//
// Time is the caller's clock in unix seconds (default Date.now() / 1000).  If the browser's
// clock disagrees with the server's, pass a corrected clock to startRenderLoop / draw().

const DEFAULTS = {
  windowSeconds: 60,
  unit: "",
  label: "",
  color: "#1c7ed6",
  lineWidth: 1.5,
  maxPoints: 10000,
  min: null, // fixed y axis bounds; null = auto-scale
  max: null,
  gapSeconds: null, // break the line where points are further apart than this
  font: "11px system-ui, -apple-system, 'Segoe UI', sans-serif",
  textColor: "#6b7280",
  gridColor: "rgba(128, 128, 128, 0.22)",
  background: null, // null = transparent (clearRect)
};

const TIME_STEPS = [
  1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
];

const SI = ["", "k", "M", "G", "T", "P"];

/** A "nice" step (1, 2 or 5 times a power of ten) at least `raw`. */
export function niceStep(raw) {
  if (!(raw > 0) || !Number.isFinite(raw)) return 1;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

/**
 * Axis bounds and ticks covering [lo, hi] with at most about `maxTicks` ticks at nice values.
 * A flat range is widened so that a constant signal sits in the middle of the chart.
 */
export function niceScale(lo, hi, maxTicks = 5) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) {
    lo = 0;
    hi = 1;
  }
  if (hi < lo) [lo, hi] = [hi, lo];
  if (hi === lo) {
    const pad = Math.abs(lo) * 0.05 || 1;
    lo -= pad;
    hi += pad;
  }
  const step = niceStep((hi - lo) / Math.max(1, maxTicks - 1));
  const min = Math.floor(lo / step) * step;
  const max = Math.ceil(hi / step) * step;
  const ticks = [];
  const n = Math.round((max - min) / step);
  for (let i = 0; i <= n; i++) ticks.push(min + i * step);
  return { min, max: max > min ? max : min + step, step, ticks };
}

/**
 * A tick label for `v` on an axis whose ticks are `step` apart: as many decimals as the step
 * needs, and SI prefixes (k, M, G...) for big numbers, e.g. 1.25M for network bytes/s.
 * `ref` (the axis' largest magnitude) picks the prefix, so one axis uses one prefix.
 */
export function formatValue(v, step, ref = Math.abs(v)) {
  const big = Math.max(Math.abs(ref), Math.abs(step));
  let scale = 1;
  let prefix = "";
  if (big >= 10000) {
    const k = Math.min(SI.length - 1, Math.floor(Math.log10(big) / 3));
    scale = Math.pow(1000, k);
    prefix = SI[k];
  }
  const s = step / scale;
  const decimals = s > 0 ? Math.min(6, Math.max(0, -Math.floor(Math.log10(s) + 1e-9))) : 0;
  const text = (v / scale).toFixed(decimals);
  // "-0" and "0k" read as bugs on an axis
  if (/^-?0(\.0*)?$/.test(text)) return text.replace("-", "");
  return text + prefix;
}

function pad2(n) {
  return n < 10 ? "0" + n : String(n);
}

function formatTime(t, step) {
  const d = new Date(t * 1000);
  const hm = pad2(d.getHours()) + ":" + pad2(d.getMinutes());
  return step >= 60 ? hm : hm + ":" + pad2(d.getSeconds());
}

export class LineChart {
  /**
   * @param {HTMLCanvasElement} canvas  sized by CSS; the chart matches its backing store to the
   *   CSS size times devicePixelRatio, and follows resizes.
   * @param {object} options  see DEFAULTS above.
   */
  constructor(canvas, options = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.options = { ...DEFAULTS, ...options };
    this.dirty = true;
    this._t = []; // times, ascending, from index _start on
    this._v = [];
    this._start = 0;
    this._paused = false;
    this._pausedAt = null;
    this._lastNow = null; // `now` of the last draw
    this._plotWidth = 0; // CSS pixels, from the last draw
    this._cssW = 0;
    this._cssH = 0;
    this._dpr = 0;
    this._needsResize = true;
    this._observer = null;
    if (typeof ResizeObserver !== "undefined") {
      this._observer = new ResizeObserver(() => {
        this._needsResize = true;
        this.dirty = true;
      });
      this._observer.observe(canvas);
    }
    if (!canvas.hasAttribute("role")) canvas.setAttribute("role", "img");
    if (this.options.label && !canvas.hasAttribute("aria-label")) {
      canvas.setAttribute("aria-label", this.options.label);
    }
  }

  /** Number of points held. */
  get size() {
    return this._t.length - this._start;
  }

  get windowSeconds() {
    return this.options.windowSeconds;
  }

  set windowSeconds(seconds) {
    if (seconds > 0) {
      this.options.windowSeconds = seconds;
      this.dirty = true;
    }
  }

  /** The newest point as [t, v], or null. */
  latest() {
    const n = this._t.length;
    return n > this._start ? [this._t[n - 1], this._v[n - 1]] : null;
  }

  /**
   * Add points [[t, v], ...] (t in unix seconds).  In time order is cheapest; a late point is
   * inserted in place.  Points with a non-finite t or v are ignored.
   */
  addPoints(points) {
    const ts = this._t;
    const vs = this._v;
    let added = false;
    for (let i = 0; i < points.length; i++) {
      const p = points[i];
      const t = p[0];
      const v = p[1];
      if (!Number.isFinite(t) || !Number.isFinite(v)) continue;
      const n = ts.length;
      if (n === this._start || t >= ts[n - 1]) {
        ts.push(t);
        vs.push(v);
      } else {
        const at = this._upperBound(t);
        ts.splice(at, 0, t);
        vs.splice(at, 0, v);
      }
      added = true;
    }
    if (!added) return;
    const excess = this.size - this.options.maxPoints;
    if (excess > 0) this._start += excess;
    const newest = ts[ts.length - 1];
    this._trim(newest - this.options.windowSeconds);
    this.dirty = true;
  }

  /** Drop every point. */
  clear() {
    this._t = [];
    this._v = [];
    this._start = 0;
    this.dirty = true;
  }

  get paused() {
    return this._paused;
  }

  /** Freeze the view at its last drawn time (or `now`); points keep arriving. */
  pause(now) {
    if (this._paused) return;
    this._paused = true;
    this._pausedAt = now ?? this._lastNow ?? Date.now() / 1000;
    this.dirty = true;
  }

  /** Back to the live view. */
  resume() {
    if (!this._paused) return;
    this._paused = false;
    this._pausedAt = null;
    this.dirty = true;
  }

  togglePause(now) {
    if (this._paused) this.resume();
    else this.pause(now);
    return this._paused;
  }

  /** Stop observing the canvas size; call when the chart is removed. */
  destroy() {
    if (this._observer) this._observer.disconnect();
    this._observer = null;
    this.clear();
  }

  /** Whether draw(now) would change anything: new data, a resize, or a scroll of >= 1 px. */
  needsDraw(now) {
    if (this.dirty || this._needsResize) return true;
    if (this._paused || this.size === 0 || this._lastNow === null) return false;
    const pxPerSecond = this._plotWidth / this.options.windowSeconds;
    return (now - this._lastNow) * pxPerSecond >= 1;
  }

  /** Mark the chart for a full redraw (e.g. after a theme change). */
  invalidate() {
    this._needsResize = true;
    this.dirty = true;
  }

  // First index >= _start whose time is > t.
  _upperBound(t) {
    const ts = this._t;
    let lo = this._start;
    let hi = ts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (ts[mid] <= t) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  // First index >= _start whose time is >= t.
  _lowerBound(t) {
    const ts = this._t;
    let lo = this._start;
    let hi = ts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (ts[mid] < t) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  // Drop points before `cutoff`, keeping the last one before it so the line enters the chart
  // from its left edge.  While paused, nothing the frozen view shows is dropped.
  _trim(cutoff) {
    if (this._paused && this._pausedAt !== null) {
      cutoff = Math.min(cutoff, this._pausedAt - this.options.windowSeconds);
    }
    const keep = this._lowerBound(cutoff) - 1;
    if (keep > this._start) this._start = keep;
    // Compact now and then, so that dropping stays O(1) amortized.
    if (this._start > 1024 && this._start * 2 > this._t.length) {
      this._t = this._t.slice(this._start);
      this._v = this._v.slice(this._start);
      this._start = 0;
    }
  }

  _resize() {
    const dpr = window.devicePixelRatio || 1;
    const w = this.canvas.clientWidth;
    const h = this.canvas.clientHeight;
    const bw = Math.max(0, Math.round(w * dpr));
    const bh = Math.max(0, Math.round(h * dpr));
    if (this.canvas.width !== bw) this.canvas.width = bw;
    if (this.canvas.height !== bh) this.canvas.height = bh;
    this._cssW = w;
    this._cssH = h;
    this._dpr = dpr;
    this._needsResize = false;
  }

  /** Draw the window ending at `now` (unix seconds), or at the pause time when paused. */
  draw(now = Date.now() / 1000) {
    // Without a ResizeObserver, the size is read again on every draw.
    const dpr = window.devicePixelRatio || 1;
    if (this._needsResize || this._observer === null || dpr !== this._dpr) this._resize();
    const W = this._cssW;
    const H = this._cssH;
    if (W <= 0 || H <= 0) return; // hidden: stay dirty, draw when shown
    const o = this.options;
    const ctx = this.ctx;
    const end = this._paused ? this._pausedAt : now;
    const start = end - o.windowSeconds;
    if (!this._paused) this._trim(start);

    ctx.setTransform(this._dpr, 0, 0, this._dpr, 0, 0);
    if (o.background) {
      ctx.fillStyle = o.background;
      ctx.fillRect(0, 0, W, H);
    } else {
      ctx.clearRect(0, 0, W, H);
    }
    ctx.font = o.font;
    ctx.textBaseline = "middle";

    // Visible points, plus one on each side so the line reaches both edges.
    const ts = this._t;
    const vs = this._v;
    const i0 = Math.max(this._start, this._lowerBound(start) - 1);
    const i1 = Math.min(ts.length, this._upperBound(end) + 1);

    let lo = o.min;
    let hi = o.max;
    if (lo === null || hi === null) {
      let dmin = Infinity;
      let dmax = -Infinity;
      for (let i = i0; i < i1; i++) {
        const v = vs[i];
        if (v < dmin) dmin = v;
        if (v > dmax) dmax = v;
      }
      if (dmin > dmax) {
        dmin = 0;
        dmax = 1;
      }
      if (lo === null) lo = dmin;
      if (hi === null) hi = dmax;
    }

    const top = 18;
    const bottom = H - 18;
    const plotH = Math.max(1, bottom - top);
    const scale = niceScale(lo, hi, Math.max(2, Math.min(8, Math.floor(plotH / 28))));
    if (o.min !== null) scale.min = o.min;
    if (o.max !== null) scale.max = o.max;
    const ref = Math.max(Math.abs(scale.min), Math.abs(scale.max));
    const labels = [];
    let labelW = 0;
    for (const v of scale.ticks) {
      if (v < scale.min - 1e-9 * scale.step || v > scale.max + 1e-9 * scale.step) continue;
      const text = formatValue(v, scale.step, ref);
      labelW = Math.max(labelW, ctx.measureText(text).width);
      labels.push([v, text]);
    }
    const left = Math.ceil(labelW) + 10;
    const right = W - 8;
    const plotW = Math.max(1, right - left);
    this._plotWidth = plotW;
    const ySpan = scale.max - scale.min || 1;
    const yOf = (v) => bottom - ((v - scale.min) / ySpan) * plotH;
    const xScale = plotW / o.windowSeconds;
    const xOf = (t) => left + (t - start) * xScale;

    // Grid and y labels.
    ctx.strokeStyle = o.gridColor;
    ctx.lineWidth = 1;
    ctx.fillStyle = o.textColor;
    ctx.textAlign = "right";
    ctx.beginPath();
    for (const [v, text] of labels) {
      const y = Math.round(yOf(v)) + 0.5;
      ctx.moveTo(left, y);
      ctx.lineTo(right, y);
      ctx.fillText(text, left - 5, y);
    }

    // Time ticks: at most one label per ~70 px, aligned to local clock time.
    const maxLabels = Math.max(1, Math.floor(plotW / 70));
    let tStep = TIME_STEPS[TIME_STEPS.length - 1];
    for (const s of TIME_STEPS) {
      if (o.windowSeconds / s <= maxLabels) {
        tStep = s;
        break;
      }
    }
    const tz = -new Date(end * 1000).getTimezoneOffset() * 60;
    ctx.textAlign = "center";
    for (let t = Math.ceil((start + tz) / tStep) * tStep - tz; t <= end; t += tStep) {
      const x = Math.round(xOf(t)) + 0.5;
      ctx.moveTo(x, top);
      ctx.lineTo(x, bottom);
      ctx.fillText(formatTime(t, tStep), Math.min(Math.max(x, left + 20), right - 20), H - 8);
    }
    ctx.stroke();

    // Header: label and unit on the left, latest value on the right.
    ctx.textAlign = "left";
    const head = o.label ? (o.unit ? o.label + " (" + o.unit + ")" : o.label) : o.unit;
    if (head) ctx.fillText(head, 4, 8);
    const last = this.latest();
    ctx.textAlign = "right";
    if (this._paused) {
      ctx.fillText("paused", right, 8);
    } else if (last) {
      ctx.fillStyle = o.color;
      const text = formatValue(last[1], scale.step / 10, ref) + (o.unit ? " " + o.unit : "");
      ctx.fillText(text, right, 8);
    }

    // The line, clipped to the plot area.
    if (i1 > i0) {
      ctx.save();
      ctx.beginPath();
      ctx.rect(left, top - 1, plotW, plotH + 2);
      ctx.clip();
      ctx.strokeStyle = o.color;
      ctx.lineWidth = o.lineWidth;
      ctx.lineJoin = "round";
      ctx.beginPath();
      if (i1 - i0 > 2 * plotW) {
        this._pathDecimated(ctx, i0, i1, xOf, yOf, start, xScale);
      } else {
        this._pathAll(ctx, i0, i1, xOf, yOf);
      }
      ctx.stroke();
      ctx.restore();
    }

    this.dirty = false;
    this._lastNow = now;
  }

  _pathAll(ctx, i0, i1, xOf, yOf) {
    const ts = this._t;
    const vs = this._v;
    const gap = this.options.gapSeconds;
    let prevT = -Infinity;
    for (let i = i0; i < i1; i++) {
      const t = ts[i];
      if (gap !== null && t - prevT > gap) ctx.moveTo(xOf(t), yOf(vs[i]));
      else if (i === i0) ctx.moveTo(xOf(t), yOf(vs[i]));
      else ctx.lineTo(xOf(t), yOf(vs[i]));
      prevT = t;
    }
  }

  // One pixel column at a time: its first, min, max (in the order they came) and last point.
  _pathDecimated(ctx, i0, i1, xOf, yOf, start, xScale) {
    const ts = this._t;
    const vs = this._v;
    const gap = this.options.gapSeconds;
    let col = null;
    let first = 0;
    let lastI = 0;
    let minI = 0;
    let maxI = 0;
    let prevT = -Infinity;
    let moved = false;
    const flush = () => {
      const x = xOf(ts[first]);
      if (!moved) {
        ctx.moveTo(x, yOf(vs[first]));
        moved = true;
      } else {
        ctx.lineTo(x, yOf(vs[first]));
      }
      const a = minI < maxI ? minI : maxI;
      const b = minI < maxI ? maxI : minI;
      const xc = x + 0.5;
      if (a !== first) ctx.lineTo(xc, yOf(vs[a]));
      if (b !== a) ctx.lineTo(xc, yOf(vs[b]));
      if (lastI !== b) ctx.lineTo(xOf(ts[lastI]), yOf(vs[lastI]));
    };
    for (let i = i0; i < i1; i++) {
      const t = ts[i];
      const c = Math.floor((t - start) * xScale);
      if (gap !== null && t - prevT > gap && col !== null) {
        flush();
        moved = false;
        col = null;
      }
      prevT = t;
      if (c !== col) {
        if (col !== null) flush();
        col = c;
        first = lastI = minI = maxI = i;
        continue;
      }
      lastI = i;
      if (vs[i] < vs[minI]) minI = i;
      if (vs[i] > vs[maxI]) maxI = i;
    }
    if (col !== null) flush();
  }
}

/**
 * Redraw `charts` (an Array or a Set, which may change while the loop runs) from one
 * requestAnimationFrame loop, drawing only the charts that need it.  Returns a stop function.
 * `clock` gives unix seconds; pass one corrected for the server's clock if they may differ.
 */
export function startRenderLoop(charts, { clock = () => Date.now() / 1000 } = {}) {
  let running = true;
  let frame = 0;
  let reported = false;
  const tick = () => {
    if (!running) return;
    const now = clock();
    for (const chart of charts) {
      if (!chart.needsDraw(now)) continue;
      try {
        chart.draw(now);
      } catch (err) {
        chart.dirty = false; // do not retry a failing chart every frame
        if (!reported) {
          reported = true;
          console.error("chart draw failed", err);
        }
      }
    }
    frame = requestAnimationFrame(tick);
  };
  frame = requestAnimationFrame(tick);
  return () => {
    running = false;
    cancelAnimationFrame(frame);
  };
}
