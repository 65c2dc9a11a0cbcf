// One cycle of Arvo's orchestrator against a django-machine-memory server:
// lock → read → write → unlock, as Arvo runs it for each event of a machine.
//
//   MM_API_URL=http://127.0.0.1:8000/api/machine-memory/ MM_API_TOKEN=<token> \
//     node examples/arvo-cycle.mjs [machine-id]
//
// Run `npm run build` first. Exit status: 0 done, 75 (EX_TEMPFAIL) when the machine is busy
// and the event should be redelivered later, 1 on an error.
import {
  HttpMachineMemory,
  LockLostError,
  WriteConflictError,
  WriteOutcomeUnknownError,
} from "django-machine-memory-client";

const baseUrl = process.env.MM_API_URL;
if (!baseUrl) {
  console.error("Set MM_API_URL (the API root, ending in /api/machine-memory/) and MM_API_TOKEN.");
  process.exit(2);
}
const id = process.argv[2] ?? `example/${new Date().toISOString()}`;

/** @type {HttpMachineMemory<{ count: number; history: string[] }>} */
const memory = new HttpMachineMemory({ baseUrl, token: process.env.MM_API_TOKEN, lockTtl: 30 });

if (!(await memory.lock(id))) {
  console.log(`${id}: another worker holds the lock; redeliver the event later.`);
  process.exit(75);
}
try {
  // Comes with the lock's answer: no second request.
  const state = await memory.read(id);
  const next = {
    count: (state?.count ?? 0) + 1,
    history: [...(state?.history ?? []), new Date().toISOString()].slice(-5),
  };
  await memory.write(id, next, state);
  console.log(`${id}: ${state === null ? "created" : "updated"}`, next);
} catch (error) {
  if (error instanceof LockLostError) {
    console.error(`${id}: the lock expired and another worker took it; nothing was written.`);
  } else if (error instanceof WriteConflictError) {
    console.error(`${id}: the state changed under us (version ${error.actualVersion}); nothing was written.`);
  } else if (error instanceof WriteOutcomeUnknownError) {
    console.error(`${id}: the write may or may not have landed; read the state before retrying.`);
  }
  process.exitCode = 1;
  throw error;
} finally {
  await memory.unlock(id);
}
