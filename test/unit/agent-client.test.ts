import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { afterAll, describe, expect, it } from "vitest";
import { AgentClient, AgentError } from "../../src/vmm/agent-client.ts";
import { PtySession } from "../../src/vmm/pty-frames.ts";

/**
 * A hostile cocoon-agent: the guest controls what its agent answers, so the
 * host's client must bound everything. Each route misbehaves in one way;
 * `sent` counts the bytes a route managed to write before the client hung up.
 */
const sent: Record<string, number> = {};
const MiB = 2 ** 20;

/** Writes `chunk` until the client goes away (or `total` bytes), honouring back-pressure. */
function flood(res: ServerResponse | Socket, name: string, chunk: Buffer, total = Infinity, then?: () => void): void {
  sent[name] = 0;
  res.on("error", () => undefined);
  const pump = () => {
    while (!res.destroyed && sent[name]! < total) {
      sent[name]! += chunk.length;
      if (!res.write(chunk)) return void res.once("drain", pump);
    }
    if (!res.destroyed) then?.();
  };
  pump();
}

const server = createServer((req: IncomingMessage, res: ServerResponse) => {
  const path = req.url!.split("?")[0];
  if (path === "/huge-json") {
    res.writeHead(200, { "content-type": "application/json" });
    return flood(res, path, Buffer.alloc(64 * 1024, " "));
  }
  if (path === "/declared-huge") {
    res.writeHead(200, { "content-type": "application/json", "content-length": String(5 * 2 ** 30) });
    return flood(res, path, Buffer.alloc(64 * 1024, " "));
  }
  if (path === "/huge-error") {
    res.writeHead(500, { "content-type": "application/json" });
    return flood(res, path, Buffer.alloc(64 * 1024, "e"));
  }
  if (path === "/stats") return; // never answers
  if (path === "/exec") {
    // The command says how to misbehave.
    let body = "";
    req.on("data", (d: Buffer) => (body += d.toString()));
    req.on("end", () => {
      const command = (JSON.parse(body) as { shell: string }).shell;
      res.writeHead(200, { "content-type": "application/x-ndjson" });
      if (command === "endless-line") return flood(res, command, Buffer.alloc(64 * 1024, "A"));
      if (command === "not-json") return void res.end("{nope\n");
      // 20 MiB of output in 32 KiB chunks, as the real agent frames it, then the exit.
      const line = Buffer.from(`${JSON.stringify({ type: "stdout", data: Buffer.alloc(32 * 1024).toString("base64") })}\n`);
      flood(res, "flood", line, line.length * 640, () => res.end(`${JSON.stringify({ type: "exit", exitCode: 0, signal: "", timedOut: false, durationMs: 5 })}\n`));
    });
    return;
  }
  res.writeHead(404).end();
});
server.on("upgrade", (req: IncomingMessage, socket: Socket) => {
  socket.on("error", () => undefined);
  socket.write("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: cocoon-pty\r\n\r\n");
  const kind = new URL(req.url!, "http://x").searchParams.get("cmd");
  if (kind === "huge-frame") {
    // A data frame header claiming 4 GiB, then bytes forever.
    const head = Buffer.from([0, 0xff, 0xff, 0xff, 0xff]);
    socket.write(head);
    return flood(socket, "huge-frame", Buffer.alloc(64 * 1024, "x"));
  }
  if (kind === "short-exit") socket.write(Buffer.from([2, 0, 0, 0, 2, 0, 7])); // an exit frame with a 2-byte code
});
await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
const connections = new Set<Socket>();
server.on("connection", (c: Socket) => connections.add(c));
afterAll(() => {
  for (const c of connections) c.destroy(); // the unanswered and upgraded ones too
  return new Promise<void>((r) => server.close(() => r()));
});
const port = (server.address() as AddressInfo).port;

const client = new AgentClient(port, "t", { jsonBytes: 1 * MiB, errorBytes: 4096, execLineBytes: 256 * 1024, execOutputBytes: 1 * MiB, headersTimeoutMs: 500, callTimeoutMs: 1000 });
afterAll(() => client.close());

describe("AgentClient against a hostile agent", () => {
  it("refuses a JSON answer past its cap instead of buffering it", async () => {
    const err = await client.json("GET", "/huge-json").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AgentError);
    expect(err).toMatchObject({ status: 502, code: "BadResponse" });
    expect((err as Error).message).toContain("exceeds 1048576 bytes");
    expect(sent["/huge-json"]).toBeLessThan(32 * MiB);
  });

  it("refuses a declared 5 GB answer before reading it", async () => {
    await expect(client.json("GET", "/declared-huge")).rejects.toMatchObject({ code: "BadResponse" });
  });

  it("keeps only the head of an endless error body", async () => {
    const err = (await client.json("GET", "/huge-error").catch((e: unknown) => e)) as AgentError;
    expect(err).toBeInstanceOf(AgentError);
    expect(err.status).toBe(500);
    expect(err.message.length).toBeLessThanOrEqual(500);
    expect(sent["/huge-error"]).toBeLessThan(32 * MiB);
  });

  it("times out a /stats poll the agent never answers", async () => {
    await expect(client.stats()).rejects.toMatchObject({ status: 504, code: "Timeout" });
  });

  it("ends an exec stream whose line never ends", async () => {
    const drain = async () => {
      for await (const _ of client.execStream({ command: "endless-line" })) void _;
    };
    await expect(drain()).rejects.toMatchObject({ code: "BadResponse", message: "an exec output line from the agent exceeds 262144 bytes" });
    expect(sent["endless-line"]).toBeLessThan(32 * MiB);
  });

  it("rejects an exec line that is not JSON", async () => {
    await expect(client.exec({ command: "not-json" })).rejects.toMatchObject({ code: "BadResponse", message: "the agent's exec stream has a line that is not JSON" });
  });

  it("collects at most its cap per stream from a flooding exec and says it truncated", async () => {
    const result = await client.exec({ command: "flood" });
    expect(result.exitCode).toBe(0);
    expect(Buffer.byteLength(result.stdout)).toBe(1 * MiB);
    expect(result.truncated).toEqual({ stdout: true, stderr: false });
  });

  it("ends a terminal whose frame header claims 4 GiB, with an error and no growth", async () => {
    const session = new PtySession(await client.pty({ cmd: "huge-frame" }));
    const err = await new Promise<Error | undefined>((r) => session.once("end", r));
    expect(err?.message).toBe("a terminal frame of 4294967295 bytes exceeds 1048576");
    expect(sent["huge-frame"]).toBeLessThan(32 * MiB);
  });

  it("ends a terminal whose exit frame is too short to hold a code, without throwing in a listener", async () => {
    const session = new PtySession(await client.pty({ cmd: "short-exit" }));
    const err = await new Promise<Error | undefined>((r) => session.once("end", r));
    expect(err?.message).toBe("an exit frame needs a 4-byte code, got 2 bytes");
  });
});
