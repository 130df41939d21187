// Runs static/js/ot.js for tests/unit/test_ot_js.py.
//
// Reads one JSON array of cases per stdin line and writes one JSON array of
// results per stdout line, so a single node process serves a whole test run.
// A case is {"fn": name, "args": [...]}; a result is {"ok": value} or
// {"error": errorName, "message": text}. fn "client" replays calls on an
// OTClient: args [rev, clientId, [[method, args], ...]] -> per call
// [result, [rev, outstanding, outstandingSeq, buffer, nextSeq]].

import { createInterface } from 'node:readline';
import * as ot from '../../static/js/ot.js';

const FUNCTIONS = {
  check: ot.check,
  lengths: ot.lengths,
  apply: ot.apply,
  compose: ot.compose,
  transform: ot.transform,
  transformIndex: ot.transformIndex,
  diffToOp: ot.diffToOp,
  cpLength: ot.cpLength,
  utf16ToCp: ot.utf16ToCp,
  cpToUtf16: ot.cpToUtf16,
  client: replayClient,
};

function replayClient(rev, clientId, calls) {
  const client = new ot.OTClient(rev, clientId);
  return calls.map(([method, args]) => {
    let result = client[method](...args);
    if (result && !Array.isArray(result) && typeof result === 'object') {
      result = [result.rev, result.op, result.seq]; // pending() / resend()
    }
    const state = [client.rev, client.outstanding, client.outstandingSeq, client.buffer, client.nextSeq];
    return [result ?? null, JSON.parse(JSON.stringify(state))];
  });
}

function run({ fn, args }) {
  try {
    return { ok: FUNCTIONS[fn](...args) };
  } catch (err) {
    return { error: err.name, message: err.message };
  }
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (line.trim()) process.stdout.write(JSON.stringify(JSON.parse(line).map(run)) + '\n');
}
