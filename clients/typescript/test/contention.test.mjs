// Four processes run Arvo's cycle on three shared ids: every event counted exactly once.
import assert from "node:assert/strict";
import { fork } from "node:child_process";
import { fileURLToPath } from "node:url";
import { test } from "node:test";
import { baseUrl, memory, token, uid } from "../testing/live.mjs";

const WORKERS = 4;
const EVENTS_PER_WORKER = 25;
const worker = fileURLToPath(new URL("../testing/worker.mjs", import.meta.url));

function run(events) {
  return new Promise((resolve, reject) => {
    const child = fork(worker, [], { stdio: ["ignore", "inherit", "inherit", "ipc"] });
    let stats;
    child.once("message", (message) => {
      stats = message;
    });
    child.once("error", reject);
    child.once("exit", (code) => {
      if (code === 0 && stats) resolve(stats);
      else reject(new Error(`worker exited with ${code}`));
    });
    child.send({ baseUrl, token, events });
  });
}

test(`${WORKERS} processes × ${EVENTS_PER_WORKER} events on 3 ids: no event lost, none applied twice`, { timeout: 50_000 }, async (t) => {
  const ids = [uid("shared-a"), uid("shared-b"), uid("shared-c")];
  const expected = new Map(ids.map((id) => [id, { count: 0, sum: 0 }]));
  const batches = [];
  let seq = 0;
  for (let w = 0; w < WORKERS; w += 1) {
    const events = [];
    for (let e = 0; e < EVENTS_PER_WORKER; e += 1) {
      seq += 1;
      const id = ids[(w + e) % ids.length];
      events.push({ id, seq });
      expected.get(id).count += 1;
      expected.get(id).sum += seq;
    }
    batches.push(events);
  }
  const results = await Promise.all(batches.map(run));
  for (const stats of results) {
    assert.deepEqual(stats.errors, []);
    assert.equal(stats.left, 0, "a worker ran out of time");
  }
  assert.equal(
    results.reduce((total, stats) => total + stats.processed, 0),
    WORKERS * EVENTS_PER_WORKER,
  );
  const reader = memory();
  for (const id of ids) {
    const state = await reader.read(id);
    assert.equal(state.count, expected.get(id).count, `${id}: count`);
    assert.equal(state.sum, expected.get(id).sum, `${id}: sum of event numbers`);
  }
  const redelivered = results.reduce((total, stats) => total + stats.redelivered, 0);
  const conflicts = results.reduce((total, stats) => total + stats.conflicts, 0);
  t.diagnostic(`redelivered ${redelivered}, conflicts ${conflicts}`);
  assert.equal(conflicts, 0, "the lock serialises the cycle: no write should lose a race");
});
