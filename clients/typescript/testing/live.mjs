// The live server the tests run against, and small helpers shared by the test files. Kept
// out of test/ because `node --test test/` runs every .mjs file under test/ as a test.
import { randomBytes } from "node:crypto";
import { HttpMachineMemory } from "../dist/index.js";

const url = process.env.MM_API_URL;
if (!url) {
  throw new Error(
    "MM_API_URL is not set: these tests run against a live django-machine-memory server. " +
      "Set MM_API_URL to its API root (e.g. http://127.0.0.1:8765/api/machine-memory/) and " +
      "MM_API_TOKEN to the DRF token of a staff user; README.md (Tests) shows how to start one.",
  );
}

export const baseUrl = url.endsWith("/") ? url : `${url}/`;
export const token = process.env.MM_API_TOKEN || undefined;

/** A prefix unique to this run, so reruns never meet the previous run's states. */
export const runPrefix = `ts-${Date.now().toString(36)}-${randomBytes(4).toString("hex")}`;

let counter = 0;
/** A fresh id for one test. */
export function uid(name = "id") {
  counter += 1;
  return `${runPrefix}/${counter}/${name}`;
}

/** A logger that keeps what it is told, for asserting on it. */
export function recordingLogger() {
  const messages = [];
  return { messages, warn: (message) => messages.push(message) };
}

/** A fetch that counts the requests it passes on. */
export function countingFetch() {
  const calls = [];
  const fetchFn = (input, init) => {
    calls.push({ method: init?.method ?? "GET", url: String(input) });
    return fetch(input, init);
  };
  return { fetch: fetchFn, calls };
}

/** A client of the live server; options override the defaults. */
export function memory(options = {}) {
  return new HttpMachineMemory({ baseUrl, token, logger: null, ...options });
}

/** GET a resource without the client: what the server itself says. */
export async function rawGet(resource, id) {
  const target = new URL(resource, baseUrl);
  target.search = new URLSearchParams({ id }).toString();
  const response = await fetch(target, {
    headers: { Accept: "application/json", ...(token ? { Authorization: `Token ${token}` } : {}) },
  });
  const text = await response.text();
  return { status: response.status, etag: response.headers.get("ETag"), body: text ? JSON.parse(text) : undefined };
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
