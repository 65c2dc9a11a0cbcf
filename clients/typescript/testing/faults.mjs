// Real faults on loopback: a server that accepts and never answers, a port nobody listens
// on, a stub that answers with chosen statuses, and a proxy that can stop passing bytes.
import http from "node:http";
import net from "node:net";

function listen(server) {
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server.address().port)));
}

function tracked(server) {
  const sockets = new Set();
  server.on("connection", (socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
  });
  return async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => server.close(resolve));
  };
}

/** A TCP server that accepts connections, reads requests (counting them) and never answers. */
export async function hungServer() {
  const state = { requests: 0 };
  const server = net.createServer((socket) => {
    socket.on("data", (chunk) => {
      if (/^[A-Z]+ \S+ HTTP\/1\.1\r\n/.test(chunk.toString("latin1"))) state.requests += 1;
    });
    socket.on("error", () => {});
  });
  const close = tracked(server);
  const port = await listen(server);
  return { url: `http://127.0.0.1:${port}/api/machine-memory/`, state, close };
}

/** The URL of a port that refuses connections (a server was there and is gone). */
export async function refusedUrl() {
  const server = net.createServer();
  const port = await listen(server);
  await new Promise((resolve) => server.close(resolve));
  return `http://127.0.0.1:${port}/api/machine-memory/`;
}

/**
 * An HTTP server whose every answer comes from `respond(request, body)` →
 * { status, headers?, body? } (body: an object sent as JSON, or a string sent as is).
 */
export async function stubServer(respond) {
  const requests = [];
  const server = http.createServer((request, response) => {
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      const body = Buffer.concat(chunks).toString();
      requests.push({ method: request.method, url: request.url, headers: request.headers, body });
      const answer = respond(request, body);
      const payload =
        answer.body === undefined ? "" : typeof answer.body === "string" ? answer.body : JSON.stringify(answer.body);
      response.writeHead(answer.status, {
        "Content-Type": typeof answer.body === "string" ? "text/html" : "application/json",
        ...answer.headers,
      });
      response.end(payload);
    });
  });
  const close = tracked(server);
  const port = await listen(server);
  return { url: `http://127.0.0.1:${port}/api/machine-memory/`, requests, close };
}

/**
 * A TCP proxy to `upstream` (an http URL). `mode` can be changed at any time:
 * "forward" passes bytes both ways; "blackhole" passes nothing (requests vanish);
 * "swallow" passes requests to the server but drops its answers.
 */
export async function faultProxy(upstream) {
  const target = new URL(upstream);
  const control = { mode: "forward", connections: 0 };
  const server = net.createServer((client) => {
    control.connections += 1;
    const server = net.connect(Number(target.port), target.hostname);
    client.on("data", (chunk) => {
      if (control.mode !== "blackhole") server.write(chunk);
    });
    server.on("data", (chunk) => {
      if (control.mode === "forward") client.write(chunk);
    });
    const end = () => {
      client.destroy();
      server.destroy();
    };
    client.on("close", end);
    server.on("close", end);
    client.on("error", end);
    server.on("error", end);
  });
  const close = tracked(server);
  const port = await listen(server);
  const url = new URL(upstream);
  url.host = `127.0.0.1:${port}`;
  return { url: url.href, control, close };
}
