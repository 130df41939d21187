// Three editors built on ot.js (npm `ot` 0.0.15: its Client and TextOperation,
// unchanged) talking to a real server's /ws/edit/<doc>?units=utf16 over Node's `ws`.
// Driven by tests/interop/test_otjs.py.
//
//   node ot_clients.js '{"base": "127.0.0.1:8888", "doc": "d", "edits": 40, "seed": 1}'
//
// The glue below is what docs/PROTOCOL.md ("Writing a client") tells a client
// author to write: subclass ot.Client with sendOperation (send {type: "op",
// rev, op, seq}) and applyOperation (apply to the local text); call serverAck
// on "ack" and applyServer on "op". ot.js counts UTF-16 code units, so every
// connection asks for ?units=utf16.
//
// Events, one JSON object per stdout line:
//   {"event": "tie", "inserted": [..], "ackRevs": [..], "texts": [..], "rev": n}
//       three inserts at the same place, made before any of them was acknowledged
//   {"event": "edited", "edits": n}        the random edits have all been made locally
//   {"event": "final", "clients": [{name, text, revision, state, errors}], "server": {rev, text}}
//       after "done" arrived on stdin and every copy is synchronized at the server's rev
// Any failure: {"event": "fatal", "message": ...} and exit code 1. A deadline bounds the run.

import { createInterface } from 'node:readline';
import ot from 'ot';
import WebSocket from 'ws';

const cfg = JSON.parse(process.argv[2]);
const deadline = setTimeout(() => fatal(`timed out after ${cfg.timeoutMs ?? 20000} ms`), cfg.timeoutMs ?? 20000);

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fatal(message) {
  emit({ event: 'fatal', message: String(message) });
  process.exit(1);
}

process.on('uncaughtException', (err) => fatal(err && err.stack ? err.stack : err));
process.on('unhandledRejection', (err) => fatal(err && err.stack ? err.stack : err));

// A small seeded PRNG (mulberry32) so a failing run can be replayed with its seed.
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const random = prng(cfg.seed ?? 1);
const pick = (list) => list[Math.floor(random() * list.length)];

// Emoji (surrogate pairs, ZWJ sequences, skin tones), CJK, accents, plain ASCII.
const PIECES = ['a', 'b', ' ', 'x', '\n', '中', '文', '字', 'é', 'e\u0301', '😀', '👍🏽', '👩‍💻', '𝔸', '🇯🇵', '漢字'];

class Editor extends ot.Client {
  constructor(name, ws, snapshot) {
    super(snapshot.rev);
    this.name = name;
    this.ws = ws;
    this.doc = snapshot.text;
    this.seq = 0;
    this.ackRevs = [];
    this.errors = [];
  }

  sendOperation(revision, operation) {
    this.seq += 1;
    this.ws.send(JSON.stringify({ type: 'op', rev: revision, op: operation.toJSON(), seq: this.seq }));
  }

  applyOperation(operation) {
    this.doc = operation.apply(this.doc);
  }

  /** A local edit, as an editor widget would report it: applied here, then handed to ot.Client. */
  edit(operation) {
    this.doc = operation.apply(this.doc);
    this.applyClient(operation);
  }

  get synchronized() {
    return this.state instanceof ot.Client.Synchronized;
  }

  onMessage(msg) {
    if (msg.type === 'ack') {
      this.serverAck();
      this.ackRevs.push(msg.rev);
      if (msg.rev !== this.revision) this.errors.push(`ack for rev ${msg.rev} at revision ${this.revision}`);
    } else if (msg.type === 'op') {
      this.applyServer(ot.TextOperation.fromJSON(msg.op));
      if (msg.rev !== this.revision) this.errors.push(`op for rev ${msg.rev} at revision ${this.revision}`);
    } else if (msg.type === 'error') {
      this.errors.push(`${msg.code}: ${msg.message}`);
    }
  }
}

function connect(name, base) {
  return new Promise((resolve, reject) => {
    const url = `ws://${base}/ws/edit/${cfg.doc}?units=utf16&name=${encodeURIComponent(name)}`;
    const ws = new WebSocket(url);
    let editor = null;
    ws.on('message', (data) => {
      const msg = JSON.parse(data.toString('utf8'));
      if (editor === null) {
        if (msg.type !== 'snapshot') return reject(new Error(`${name}: expected a snapshot, got ${data}`));
        if (msg.units !== 'utf16') return reject(new Error(`${name}: the server did not take ?units=utf16`));
        editor = new Editor(name, ws, msg);
        resolve(editor);
        return;
      }
      try {
        editor.onMessage(msg);
      } catch (err) {
        editor.errors.push(`${msg.type} could not be applied: ${err.message}`);
      }
    });
    ws.on('error', reject);
    ws.on('close', (code) => {
      if (editor && !editor.closing) editor.errors.push(`closed by the server with ${code}`);
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function serverDoc() {
  const resp = await fetch(`http://${cfg.base}/api/docs/${cfg.doc}`);
  return resp.json();
}

/** Wait until every editor is synchronized at the server's revision (nobody else is editing). */
async function settle(editors) {
  for (;;) {
    const server = await serverDoc();
    if (editors.every((e) => e.synchronized && e.revision === server.rev)) return server;
    for (const e of editors) if (e.errors.length) fatal(`${e.name}: ${e.errors.join('; ')}`);
    await sleep(20);
  }
}

/** UTF-16 index of code point `cp` in `s` (editors hand ot.js UTF-16 indexes). */
function utf16Index(s, cp) {
  return Array.from(s).slice(0, cp).join('').length;
}

function randomEdit(editor) {
  const doc = editor.doc;
  const points = Array.from(doc).length;
  const op = new ot.TextOperation();
  const at = Math.floor(random() * (points + 1));
  const start = utf16Index(doc, at);
  if (points > at && random() < 0.3) {
    const count = 1 + Math.floor(random() * Math.min(3, points - at));
    const end = utf16Index(doc, at + count);
    op.retain(start).delete(end - start).retain(doc.length - end);
  } else {
    let text = '';
    for (let i = 1 + Math.floor(random() * 3); i > 0; i--) text += pick(PIECES);
    op.retain(start).insert(text).retain(doc.length - start);
  }
  editor.edit(op);
}

async function main() {
  const names = ['ann', 'bob', 'cat'];
  const editors = [];
  // cfg.bases (several nodes of one cluster): editor i connects to bases[i % n].
  const bases = cfg.bases ?? [cfg.base];
  for (const [i, name] of names.entries()) editors.push(await connect(name, bases[i % bases.length]));

  // 1. A seed text, then three inserts at one place (after the first emoji, UTF-16
  // index 2), all made before the server has acknowledged any of them.
  const seed = '😀 ties go here: ';
  const first = editors[0];
  first.edit(new ot.TextOperation().retain(first.doc.length).insert(seed));
  await settle(editors);
  const inserted = ['A😀', 'B中文', 'C👍🏽'];
  editors.forEach((e, i) => {
    const at = utf16Index(e.doc, 1);
    e.edit(new ot.TextOperation().retain(at).insert(inserted[i]).retain(e.doc.length - at));
  });
  const tie = await settle(editors);
  emit({
    event: 'tie',
    inserted,
    ackRevs: editors.map((e) => e.ackRevs[e.ackRevs.length - 1]),
    texts: editors.map((e) => e.doc),
    rev: tie.rev,
    server: tie.text,
  });

  // 2. Random edits, concurrent, with the server's messages interleaved.
  await Promise.all(
    editors.map(async (e) => {
      for (let i = 0; i < cfg.edits; i++) {
        randomEdit(e);
        await sleep(Math.floor(random() * 4));
      }
    }),
  );
  emit({ event: 'edited', edits: cfg.edits * editors.length });

  // 3. Once the test says nobody else edits any more: every copy at the server's rev.
  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) if (line.trim() === 'done') break;
  lines.close();
  process.stdin.destroy(); // nothing more to read: let the process end once the sockets close
  const server = await settle(editors);
  emit({
    event: 'final',
    server,
    clients: editors.map((e) => ({
      name: e.name,
      text: e.doc,
      revision: e.revision,
      synchronized: e.synchronized,
      errors: e.errors,
    })),
  });
  for (const e of editors) {
    e.closing = true;
    e.ws.close();
  }
  clearTimeout(deadline);
}

main().catch((err) => fatal(err && err.stack ? err.stack : err));
