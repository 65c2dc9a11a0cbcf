// lock, unlock, extend and fencing against the live server.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { LockLostError, WriteConflictError } from "../dist/index.js";
import { countingFetch, memory, rawGet, recordingLogger, sleep, uid } from "../testing/live.mjs";

describe("lock", () => {
  test("acquires, and the next read comes with it (one request for both)", async () => {
    const id = uid();
    await memory().write(id, { n: 1 }, null);
    const counting = countingFetch();
    const mm = memory({ fetch: counting.fetch });
    assert.equal(await mm.lock(id), true);
    const state = await mm.read(id);
    assert.deepEqual(state, { n: 1 });
    assert.deepEqual(
      counting.calls.map((call) => call.method),
      ["POST"],
    );
    // One-shot: the next read asks the server.
    await mm.read(id);
    assert.equal(counting.calls.length, 2);
    // The state that came with the lock is a valid prevData.
    await mm.write(id, { n: 2 }, state);
    assert.equal(await mm.unlock(id), true);
    assert.deepEqual(await memory().read(id), { n: 2 });
  });

  test("a lock on a machine without state reads null", async () => {
    const id = uid();
    const mm = memory();
    assert.equal(await mm.lock(id), true);
    assert.equal(await mm.read(id), null);
    await mm.write(id, { n: 1 }, null);
    assert.equal(await mm.unlock(id), true);
  });

  test("denial: false after the retries, quickly", async () => {
    const id = uid();
    const holder = memory();
    assert.equal(await holder.lock(id), true);
    const other = memory();
    const started = performance.now();
    assert.equal(await other.lock(id), false);
    const elapsed = performance.now() - started;
    // 3 retries after 50, 100 and 200 ms (±10 %), plus four requests.
    assert.ok(elapsed >= 300 && elapsed < 1500, `denied after ${elapsed} ms`);
    const quick = memory({ lockRetries: 0 });
    const quickStarted = performance.now();
    assert.equal(await quick.lock(id), false);
    assert.ok(performance.now() - quickStarted < 500);
    assert.equal(await holder.unlock(id), true);
    assert.equal(await other.lock(id), true);
    assert.equal(await other.unlock(id), true);
  });

  test("a second lock() by the holder is false (not reentrant)", async () => {
    const id = uid();
    const mm = memory({ lockRetries: 0 });
    assert.equal(await mm.lock(id), true);
    assert.equal(await mm.lock(id), false);
    assert.equal(await mm.unlock(id), true);
  });

  test("wait: the server waits for a lock that is released meanwhile", async () => {
    const id = uid();
    const holder = memory();
    assert.equal(await holder.lock(id), true);
    const waiter = memory({ lockRetries: 0 });
    const pending = waiter.lock(id, { wait: 1 });
    await sleep(150);
    assert.equal(await holder.unlock(id), true);
    assert.equal(await pending, true);
    assert.equal(await waiter.unlock(id), true);
  });

  test("an expired lock is taken over", async () => {
    const id = uid();
    assert.equal(await memory({ lockTtl: 0.1 }).lock(id), true);
    await sleep(200);
    const mm = memory();
    assert.equal(await mm.lock(id), true);
    assert.equal(await mm.unlock(id), true);
  });
});

describe("unlock", () => {
  test("with no lock held: true, without a request", async () => {
    const counting = countingFetch();
    assert.equal(await memory({ fetch: counting.fetch }).unlock(uid()), true);
    assert.equal(counting.calls.length, 0);
  });

  test("after the lock expired and nobody took it: true", async () => {
    const id = uid();
    const mm = memory({ lockTtl: 0.1 });
    assert.equal(await mm.lock(id), true);
    await sleep(200);
    assert.equal(await mm.unlock(id), true);
  });

  test("by a former holder whose lock was taken over: false, and the new lock stays", async () => {
    const id = uid();
    const logger = recordingLogger();
    const stale = memory({ lockTtl: 0.2, logger });
    assert.equal(await stale.lock(id), true);
    await sleep(300);
    const holder = memory();
    assert.equal(await holder.lock(id), true);
    assert.equal(await stale.unlock(id), false);
    const info = await rawGet("lock/", id);
    assert.equal(info.status, 200, "the holder's lock must be left alone");
    assert.equal(await memory({ lockRetries: 0 }).lock(id), false);
    assert.equal(await holder.unlock(id), true);
    assert.equal((await rawGet("lock/", id)).status, 404);
    assert.deepEqual(logger.messages, [], "a lock taken over is an answer, not a failure");
  });
});

describe("extend", () => {
  test("pushes the expiry of a held lock; false without one", async () => {
    const id = uid();
    const mm = memory({ lockTtl: 0.3 });
    assert.equal(await mm.extend(id), false);
    assert.equal(await mm.lock(id), true);
    assert.equal(await mm.extend(id, 5), true);
    await sleep(400);
    assert.equal(await memory({ lockRetries: 0 }).lock(id), false, "extended lock expired");
    assert.equal(await mm.unlock(id), true);
  });

  test("false once the lock was taken over", async () => {
    const id = uid();
    const mm = memory({ lockTtl: 0.1 });
    assert.equal(await mm.lock(id), true);
    await sleep(200);
    const other = memory();
    assert.equal(await other.lock(id), true);
    assert.equal(await mm.extend(id), false);
    assert.equal(await other.unlock(id), true);
  });
});

describe("fencing", () => {
  test("a holder whose lock expired and was taken over cannot write: LockLostError", async () => {
    const id = uid();
    await memory().write(id, { n: 1 }, null);
    const a = memory({ lockTtl: 0.2 });
    assert.equal(await a.lock(id), true);
    const seenByA = await a.read(id);
    await sleep(300);
    const b = memory();
    assert.equal(await b.lock(id), true);
    await assert.rejects(a.write(id, { n: 2, by: "a" }, seenByA), (error) => {
      assert.ok(error instanceof LockLostError);
      assert.ok(error instanceof WriteConflictError);
      assert.equal(error.code, "lock_lost");
      assert.equal(error.status, 409);
      return true;
    });
    // Arvo's failure record from the stale holder is fenced too.
    await assert.rejects(a.write(id, { failed: true }, null), LockLostError);
    const stored = await rawGet("state/", id);
    assert.deepEqual(stored.body.data, { n: 1 });
    assert.equal(stored.body.version, 1);
    // The new holder writes.
    const seenByB = await b.read(id);
    await b.write(id, { n: 2, by: "b" }, seenByB);
    assert.equal(await b.unlock(id), true);
    assert.equal(await a.unlock(id), true, "its lock is gone and nobody holds one now");
  });

  test("fenced even after the new holder released the lock", async () => {
    const id = uid();
    const a = memory({ lockTtl: 0.1 });
    assert.equal(await a.lock(id), true);
    await sleep(200);
    const b = memory();
    assert.equal(await b.lock(id), true);
    assert.equal(await b.unlock(id), true);
    await assert.rejects(a.write(id, { n: 1 }, null), LockLostError);
    assert.equal(await memory().read(id), null);
  });

  test("a holder whose lock expired but was not taken over still writes", async () => {
    const id = uid();
    const a = memory({ lockTtl: 0.1 });
    assert.equal(await a.lock(id), true);
    await sleep(200);
    await a.write(id, { n: 1 }, null);
    assert.equal(await a.unlock(id), true);
    assert.deepEqual(await memory().read(id), { n: 1 });
  });
});
