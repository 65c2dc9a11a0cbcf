// Failures injected for real on loopback: a server that never answers, a refused port, a
// proxy that drops bytes, and a stub that answers with the API's error statuses.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import {
  HttpMachineMemory,
  LockError,
  MachineMemoryError,
  ReadError,
  RequestError,
  WriteError,
  WriteOutcomeUnknownError,
} from "../dist/index.js";
import { faultProxy, hungServer, refusedUrl, stubServer } from "../testing/faults.mjs";
import { baseUrl, memory, rawGet, recordingLogger, token, uid } from "../testing/live.mjs";

const elapsedSince = (started) => performance.now() - started;

describe("a server that accepts connections and never answers", async () => {
  const hung = await hungServer();
  after(() => hung.close());

  test("read: ReadError within 1 s with the defaults", async () => {
    const mm = new HttpMachineMemory({ baseUrl: hung.url, logger: null });
    const started = performance.now();
    await assert.rejects(mm.read(uid()), (error) => {
      assert.ok(error instanceof ReadError);
      assert.equal(error.code, "timeout");
      assert.ok(error.cause instanceof MachineMemoryError);
      return true;
    });
    const elapsed = elapsedSince(started);
    assert.ok(elapsed >= 900 && elapsed < 1300, `gave up after ${elapsed} ms`);
  });

  test("read: three attempts when each may take 200 ms", async () => {
    const before = hung.state.requests;
    const mm = new HttpMachineMemory({ baseUrl: hung.url, timeoutMs: 200, logger: null });
    const started = performance.now();
    await assert.rejects(mm.read(uid()), (error) => error instanceof ReadError && error.attempts === 3);
    const elapsed = elapsedSince(started);
    // 200 + 100 + 200 + 200 + 200 ms.
    assert.ok(elapsed >= 850 && elapsed < 1200, `gave up after ${elapsed} ms`);
    assert.equal(hung.state.requests - before, 3);
  });

  test("write: WriteOutcomeUnknownError, not a WriteError, after timeoutMs, without retrying", async () => {
    const before = hung.state.requests;
    const mm = new HttpMachineMemory({ baseUrl: hung.url, timeoutMs: 300, logger: null });
    const started = performance.now();
    await assert.rejects(mm.write(uid(), { n: 1 }, null), (error) => {
      assert.ok(error instanceof WriteOutcomeUnknownError);
      assert.ok(!(error instanceof WriteError));
      assert.equal(error.code, "timeout");
      assert.equal(error.expectedVersion, null);
      return true;
    });
    const elapsed = elapsedSince(started);
    assert.ok(elapsed >= 290 && elapsed < 600, `gave up after ${elapsed} ms`);
    assert.equal(hung.state.requests - before, 1);
  });

  test("lock: LockError (not false) after one retry", async () => {
    const before = hung.state.requests;
    const mm = new HttpMachineMemory({ baseUrl: hung.url, timeoutMs: 200, logger: null });
    await assert.rejects(mm.lock(uid()), (error) => error instanceof LockError && error.code === "timeout");
    assert.equal(hung.state.requests - before, 2);
  });
});

describe("a port that refuses connections", async () => {
  const url = await refusedUrl();

  test("read: ReadError network_error after three quick attempts", async () => {
    const mm = new HttpMachineMemory({ baseUrl: url, logger: null });
    const started = performance.now();
    await assert.rejects(mm.read(uid()), (error) => {
      assert.ok(error instanceof ReadError);
      assert.equal(error.code, "network_error");
      assert.equal(error.attempts, 3);
      return true;
    });
    assert.ok(elapsedSince(started) < 1000);
  });

  test("write: WriteError (nothing can have been stored)", async () => {
    const mm = new HttpMachineMemory({ baseUrl: url, logger: null });
    await assert.rejects(mm.write(uid(), { n: 1 }, null), (error) => {
      assert.ok(error instanceof WriteError);
      assert.equal(error.code, "network_error");
      return true;
    });
  });

  test("lock: LockError", async () => {
    const mm = new HttpMachineMemory({ baseUrl: url, logger: null });
    await assert.rejects(mm.lock(uid()), LockError);
  });
});

describe("a connection that stops passing bytes (proxy to the live server)", async () => {
  const proxy = await faultProxy(baseUrl);
  after(() => proxy.close());

  test("a write whose answer is lost: WriteOutcomeUnknownError, and it did land", async () => {
    proxy.control.mode = "swallow";
    try {
      const id = uid();
      const mm = new HttpMachineMemory({ baseUrl: proxy.url, token, timeoutMs: 500, logger: null });
      await assert.rejects(mm.write(id, { landed: true }, null), WriteOutcomeUnknownError);
      // The point of the distinction: a WriteError would have said nothing was stored.
      assert.deepEqual(await memory().read(id), { landed: true });
    } finally {
      proxy.control.mode = "forward";
    }
  });

  test("a lock whose answer is lost is found again by the retry, not left to expire", async () => {
    const id = uid();
    const mm = new HttpMachineMemory({ baseUrl: proxy.url, token, timeoutMs: 400, logger: null });
    proxy.control.mode = "swallow";
    const pending = mm.lock(id);
    // The server took the lock and answered; the answer is gone. Let the retry through.
    await new Promise((resolve) => setTimeout(resolve, 150));
    proxy.control.mode = "forward";
    try {
      assert.equal(await pending, true);
      assert.equal((await rawGet("lock/", id)).status, 200);
      await mm.write(id, { n: 1 }, await mm.read(id)); // fenced by the recovered token
      assert.equal(await mm.unlock(id), true);
      assert.equal((await rawGet("lock/", id)).status, 404);
    } finally {
      proxy.control.mode = "forward";
    }
  });

  test("unlock when the server cannot be reached: false and a warning, never a throw", async () => {
    const id = uid();
    const logger = recordingLogger();
    const mm = new HttpMachineMemory({ baseUrl: proxy.url, token, timeoutMs: 200, logger });
    assert.equal(await mm.lock(id), true);
    proxy.control.mode = "blackhole";
    try {
      const started = performance.now();
      assert.equal(await mm.unlock(id), false);
      const elapsed = elapsedSince(started);
      // Three attempts of 200 ms, after 50 and 100 ms.
      assert.ok(elapsed >= 700 && elapsed < 1200, `gave up after ${elapsed} ms`);
      assert.equal(logger.messages.length, 1);
      assert.match(logger.messages[0], /unlock/);
    } finally {
      proxy.control.mode = "forward";
    }
    // The lock is still there, to expire by its TTL.
    assert.equal((await rawGet("lock/", id)).status, 200);
  });

  test("a read that loses its first connection succeeds on the retry", async () => {
    const id = uid();
    await memory().write(id, { n: 1 }, null);
    const mm = new HttpMachineMemory({ baseUrl: proxy.url, token, timeoutMs: 300, logger: null });
    proxy.control.mode = "blackhole";
    setTimeout(() => {
      proxy.control.mode = "forward";
    }, 150);
    const started = performance.now();
    assert.deepEqual(await mm.read(id), { n: 1 });
    assert.ok(elapsedSince(started) < 1000);
  });
});

describe("answers of the API's error statuses (stub server)", () => {
  const error = (status, code, headers = {}) => ({ status, headers, body: { code, detail: `stub ${code}` } });

  test("read retries 503 storage_unavailable, then ReadError with the code", async () => {
    const stub = await stubServer(() => error(503, "storage_unavailable", { "Retry-After": "1" }));
    try {
      const mm = new HttpMachineMemory({ baseUrl: stub.url, logger: null });
      await assert.rejects(mm.read("x"), (e) => {
        assert.ok(e instanceof ReadError);
        assert.equal(e.code, "storage_unavailable");
        assert.equal(e.status, 503);
        return true;
      });
      assert.equal(stub.requests.length, 3);
    } finally {
      await stub.close();
    }
  });

  test("read never retries a refusal: 401 → RequestError at once", async () => {
    const stub = await stubServer(() => error(401, "not_authenticated"));
    try {
      const mm = new HttpMachineMemory({ baseUrl: stub.url, logger: null });
      await assert.rejects(mm.read("x"), (e) => e instanceof RequestError && e.code === "not_authenticated");
      assert.equal(stub.requests.length, 1);
    } finally {
      await stub.close();
    }
  });

  test("a 404 that is not the API's not_found (wrong base URL) is an error, not null", async () => {
    const stub = await stubServer(() => ({ status: 404, body: "<html>Not Found</html>" }));
    try {
      const mm = new HttpMachineMemory({ baseUrl: stub.url, logger: null });
      await assert.rejects(mm.read("x"), (e) => e instanceof RequestError && e.code === "unexpected_response");
    } finally {
      await stub.close();
    }
  });

  test("write: storage_unavailable → WriteError; write_outcome_unknown and 502 → WriteOutcomeUnknownError", async () => {
    for (const [answer, kind] of [
      [error(503, "storage_unavailable"), WriteError],
      [error(503, "write_outcome_unknown"), WriteOutcomeUnknownError],
      [{ status: 502, body: "<html>Bad Gateway</html>" }, WriteOutcomeUnknownError],
    ]) {
      const stub = await stubServer(() => answer);
      try {
        const mm = new HttpMachineMemory({ baseUrl: stub.url, logger: null });
        await assert.rejects(mm.write("x", { n: 1 }, null), (e) => {
          assert.ok(e instanceof kind, `${answer.status}: ${e}`);
          assert.equal(e instanceof WriteError, kind === WriteError);
          return true;
        });
        assert.equal(stub.requests.length, 1, "writes are never retried");
      } finally {
        await stub.close();
      }
    }
  });

  test("requests: query-parameter ids, auth header, preconditions", async () => {
    const stub = await stubServer((request) =>
      request.method === "POST"
        ? { status: 201, body: { id: "a b", lock_token: "7.secretsecretsecret", token: 7, state: null } }
        : { status: 201, headers: { ETag: '"1"' }, body: { id: "a b", version: 1 } },
    );
    try {
      const mm = new HttpMachineMemory({ baseUrl: stub.url.replace(/\/$/, ""), token: "k", logger: null });
      await mm.write("a b", { n: 1 }, null);
      assert.equal(await mm.lock("a b"), true);
      assert.equal(await mm.read("a b"), null, "served from the lock's answer");
      await mm.write("a b", { n: 2 }, null);
      const [create, lock, overwrite] = stub.requests;
      assert.equal(create.url, "/api/machine-memory/state/?id=a+b");
      assert.equal(create.headers.authorization, "Token k");
      assert.equal(create.headers["if-none-match"], "*");
      assert.equal(create.headers["lock-token"], undefined);
      assert.deepEqual(JSON.parse(create.body), { data: { n: 1 } });
      assert.equal(lock.url, "/api/machine-memory/lock/?id=a+b");
      const { secret, ...options } = JSON.parse(lock.body);
      assert.deepEqual(options, { read: true });
      assert.match(secret, /^[A-Za-z0-9_-]{43}$/); // 256 random bits, base64url
      assert.equal(overwrite.headers["lock-token"], "7.secretsecretsecret");
      assert.equal(overwrite.headers["if-none-match"], undefined);
      assert.equal(overwrite.headers["if-match"], undefined);
      assert.equal(stub.requests.length, 3);
    } finally {
      await stub.close();
    }
  });
});
