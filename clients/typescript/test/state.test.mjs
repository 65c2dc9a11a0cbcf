// read and write against the live server: compare-and-set from every kind of prevData.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  MachineMemoryError,
  RequestError,
  WriteConflictError,
  WriteError,
  hasErrorCode,
} from "../dist/index.js";
import { countingFetch, memory, rawGet, uid } from "../testing/live.mjs";

describe("read", () => {
  test("returns null for a machine without state", async () => {
    assert.equal(await memory().read(uid("none")), null);
  });

  test("returns what was written, as a fresh object each time", async () => {
    const id = uid();
    const mm = memory();
    const state = { step: 1, nested: { list: [1, "two", null, true], text: "é 日本" } };
    await mm.write(id, state, null);
    const first = await mm.read(id);
    const second = await mm.read(id);
    assert.deepEqual(first, state);
    assert.notEqual(first, second);
  });
});

describe("write", () => {
  test("creates with prevData null; the server stores version 1", async () => {
    const id = uid();
    await memory().write(id, { step: 1 }, null);
    const stored = await rawGet("state/", id);
    assert.equal(stored.status, 200);
    assert.deepEqual(stored.body.data, { step: 1 });
    assert.equal(stored.body.version, 1);
    assert.equal(stored.etag, '"1"');
  });

  test("updates from the object read() returned, mutated since (Arvo's resumables)", async () => {
    const id = uid();
    const mm = memory();
    await mm.write(id, { count: 1, items: ["a"] }, null);
    const state = await mm.read(id);
    state.count += 1;
    state.items.push("b");
    // The mutated object is both the new state and the previous snapshot.
    await mm.write(id, state, state);
    assert.deepEqual(await memory().read(id), { count: 2, items: ["a", "b"] });
    // And the stored object stands for the version just written.
    await mm.write(id, { count: 3, items: [] }, state);
    assert.equal((await rawGet("state/", id)).body.version, 3);
  });

  test("updates from a plain equal object with its keys in another order (another process)", async () => {
    const id = uid();
    await memory().write(id, { b: 2, a: { y: 1, x: [{ q: 1, p: 2 }] }, c: "three" }, null);
    const counting = countingFetch();
    const other = memory({ fetch: counting.fetch });
    const copy = JSON.parse('{"c": "three", "a": {"x": [{"p": 2, "q": 1}], "y": 1}, "b": 2}');
    await other.write(id, { b: 3 }, copy);
    assert.deepEqual(await memory().read(id), { b: 3 });
    // It knew nothing of the id: one GET to compare, one PUT.
    assert.deepEqual(
      counting.calls.map((call) => call.method),
      ["GET", "PUT"],
    );
  });

  test("a plain equal copy of a state this client saw needs no extra request", async () => {
    const id = uid();
    const counting = countingFetch();
    const mm = memory({ fetch: counting.fetch });
    await mm.write(id, { z: 1, a: { c: 3, b: 2 } }, null);
    await mm.read(id);
    counting.calls.length = 0;
    await mm.write(id, { z: 2 }, { a: { b: 2, c: 3 }, z: 1 });
    assert.deepEqual(
      counting.calls.map((call) => call.method),
      ["PUT"],
    );
    assert.deepEqual(await mm.read(id), { z: 2 });
  });

  test("stale prevData: WriteConflictError with both versions, and nothing written", async () => {
    const id = uid();
    const a = memory();
    const b = memory();
    await a.write(id, { n: 1 }, null);
    const seenByA = await a.read(id);
    const seenByB = await b.read(id);
    await b.write(id, { n: 2, by: "b" }, seenByB);
    await assert.rejects(a.write(id, { n: 2, by: "a" }, seenByA), (error) => {
      assert.ok(error instanceof WriteConflictError);
      assert.ok(error instanceof WriteError);
      assert.ok(error instanceof MachineMemoryError);
      assert.equal(error.code, "precondition_failed");
      assert.equal(error.status, 412);
      assert.equal(error.id, id);
      assert.equal(error.expectedVersion, 1);
      assert.equal(error.actualVersion, 2);
      return true;
    });
    assert.deepEqual(await memory().read(id), { n: 2, by: "b" });
  });

  test("a plain prevData that is not the stored state: WriteConflictError, nothing written", async () => {
    const id = uid();
    await memory().write(id, { n: 1 }, null);
    await assert.rejects(memory().write(id, { n: 3 }, { n: 2 }), (error) => {
      assert.ok(error instanceof WriteConflictError);
      assert.equal(error.code, "stale_prev_data");
      assert.equal(error.actualVersion, 1);
      return true;
    });
    await assert.rejects(memory().write(uid("absent"), { n: 3 }, { n: 2 }), (error) => {
      assert.ok(error instanceof WriteConflictError);
      assert.equal(error.actualVersion, null);
      return true;
    });
    assert.deepEqual(await memory().read(id), { n: 1 });
  });

  test("prevData null over an existing state without the lock: WriteConflictError", async () => {
    const id = uid();
    await memory().write(id, { n: 1 }, null);
    await assert.rejects(memory().write(id, { failed: true }, null), (error) => {
      assert.ok(error instanceof WriteConflictError);
      assert.equal(error.code, "precondition_failed");
      assert.equal(error.expectedVersion, null);
      assert.equal(error.actualVersion, 1);
      return true;
    });
    assert.deepEqual(await memory().read(id), { n: 1 });
  });

  test("prevData null over an existing state with the lock held: stored (Arvo's failure record)", async () => {
    const id = uid();
    await memory().write(id, { n: 1 }, null);
    const mm = memory();
    assert.equal(await mm.lock(id), true);
    try {
      await mm.write(id, { failed: true, error: "boom" }, null);
    } finally {
      assert.equal(await mm.unlock(id), true);
    }
    const stored = await rawGet("state/", id);
    assert.deepEqual(stored.body.data, { failed: true, error: "boom" });
    assert.equal(stored.body.version, 2);
  });

  test("the written object stands for the new version: write(id, newer, data) needs no read", async () => {
    const id = uid();
    const counting = countingFetch();
    const mm = memory({ fetch: counting.fetch });
    const first = { n: 1 };
    const second = { n: 2 };
    await mm.write(id, first, null);
    await mm.write(id, second, first);
    await mm.write(id, { n: 3 }, second);
    assert.deepEqual(
      counting.calls.map((call) => call.method),
      ["PUT", "PUT", "PUT"],
    );
    assert.deepEqual(await mm.read(id), { n: 3 });
  });

  test("data that is not JSON is refused before any request", async () => {
    const counting = countingFetch();
    const mm = memory({ fetch: counting.fetch });
    const cyclic = {};
    cyclic.self = cyclic;
    await assert.rejects(mm.write(uid(), cyclic, null), (error) => hasErrorCode(error, "invalid_state"));
    await assert.rejects(mm.write(uid(), { n: 1n }, null), (error) => error instanceof RequestError);
    assert.equal(counting.calls.length, 0);
  });

  test("a state the server refuses (NUL in a string): RequestError invalid_state", async () => {
    await assert.rejects(memory().write(uid(), { text: "a\u0000b" }, null), (error) => {
      assert.ok(error instanceof RequestError);
      assert.equal(error.code, "invalid_state");
      assert.equal(error.status, 400);
      return true;
    });
  });
});

describe("ids", () => {
  const special = [".", "..", "a/b", "50% é", "x?y#z&id=1", "日本", "+=/", " lead and trail ", "%41", "a\nb"];

  for (const id of special) {
    test(`${JSON.stringify(id)} round-trips as itself`, async () => {
      // These exact ids outlive a run, so the state is overwritten under the lock with a
      // marker of this run, which is then read back.
      const marker = { id, run: uid("marker") };
      const mm = memory({ lockTtl: 5 });
      assert.equal(await mm.lock(id), true);
      try {
        await mm.write(id, marker, null);
      } finally {
        assert.equal(await mm.unlock(id), true);
      }
      assert.deepEqual(await memory().read(id), marker);
      const stored = await rawGet("state/", id);
      assert.equal(stored.body.id, id, "the server saw another id");
    });
  }

  test("new ids with special characters create and update", async () => {
    const mm = memory();
    for (const name of special) {
      const id = uid(name);
      await mm.write(id, { name }, null);
      const state = await mm.read(id);
      await mm.write(id, { name, n: 2 }, state);
      assert.deepEqual(await memory().read(id), { name, n: 2 });
    }
  });

  test("512 characters is the limit, counted in characters, not UTF-16 units", async () => {
    const longest = `${uid("x")}-`.padEnd(511, "x") + "😀";
    assert.equal([...longest].length, 512);
    const mm = memory();
    await mm.write(longest, { ok: true }, null);
    assert.deepEqual(await mm.read(longest), { ok: true });
    const prefix = uid("e");
    const emoji = prefix + "😀".repeat(512 - prefix.length); // about 1000 UTF-16 units
    assert.ok(emoji.length > 900);
    const locker = memory();
    assert.equal(await locker.lock(emoji), true);
    assert.equal(await locker.unlock(emoji), true);
  });

  test("invalid ids: RequestError invalid_id from every operation", async () => {
    const mm = memory();
    for (const id of ["x".repeat(513), "", "a\u0000b"]) {
      for (const call of [() => mm.read(id), () => mm.write(id, { n: 1 }, null), () => mm.lock(id)]) {
        await assert.rejects(call(), (error) => {
          assert.ok(error instanceof RequestError, String(error));
          assert.equal(error.code, "invalid_id");
          assert.equal(error.status, 400);
          return true;
        });
      }
    }
    // A lone surrogate cannot be sent (UTF-8 would turn it into U+FFFD, another id).
    await assert.rejects(mm.read("a\uD800b"), (error) => hasErrorCode(error, "invalid_id"));
  });
});
