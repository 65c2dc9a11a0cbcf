// One worker process of the contention test: Arvo's cycle lock → read → write → unlock for
// each event it is given, re-queueing an event whose lock() was refused (redelivery).
import { HttpMachineMemory, WriteConflictError } from "../dist/index.js";

process.once("message", async ({ baseUrl, token, events }) => {
  // Few, short lock retries: a refusal soon becomes a redelivery, so that path runs too.
  const mm = new HttpMachineMemory({ baseUrl, token, lockTtl: 30, lockRetries: 1, lockBackoffMs: 10, logger: null });
  const queue = [...events];
  const stats = { processed: 0, redelivered: 0, conflicts: 0, errors: [] };
  const deadline = Date.now() + 40_000;
  while (queue.length > 0 && Date.now() < deadline) {
    const event = queue.shift();
    try {
      if (!(await mm.lock(event.id))) {
        stats.redelivered += 1;
        queue.push(event);
        await new Promise((resolve) => setTimeout(resolve, 5 + 10 * Math.random()));
        continue;
      }
    } catch (error) {
      stats.errors.push(`lock: ${error}`);
      queue.push(event);
      continue;
    }
    try {
      const state = await mm.read(event.id);
      const next =
        state === null
          ? { count: 1, sum: event.seq, last: event.seq }
          : { ...state, count: state.count + 1, sum: state.sum + event.seq, last: event.seq };
      await mm.write(event.id, next, state);
      stats.processed += 1;
    } catch (error) {
      // Not applied (a conflict means nothing was stored): redeliver. Anything else is a
      // failure the parent reports.
      if (error instanceof WriteConflictError) stats.conflicts += 1;
      else stats.errors.push(`${error.name}: ${error.message}`);
      queue.push(event);
    } finally {
      await mm.unlock(event.id);
    }
  }
  stats.left = queue.length;
  process.send(stats, () => process.exit(0));
});
