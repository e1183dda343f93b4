import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { QmpClient, QmpError } from "../../src/vmm/qmp.ts";

/** A stand-in QMP peer speaking the wire format, for client tests that need no QEMU. */
async function withFakeQmp(handle: (msg: { execute: string; id: number }, sock: Socket) => void, fn: (path: string) => Promise<void>) {
  const dir = await mkdtemp(join(tmpdir(), "qmp-"));
  const path = join(dir, "qmp.sock");
  const server = createServer((sock) => {
    sock.write(`${JSON.stringify({ QMP: { version: {}, capabilities: [] } })}\n`);
    let buf = "";
    sock.on("data", (d) => {
      buf += d.toString();
      for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
        handle(JSON.parse(buf.slice(0, nl)), sock);
        buf = buf.slice(nl + 1);
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  try {
    await fn(path);
  } finally {
    server.close();
    await rm(dir, { recursive: true, force: true });
  }
}

describe("QmpClient", () => {
  it("negotiates, matches answers to commands, surfaces errors and events", async () => {
    await withFakeQmp(
      (msg, sock) => {
        if (msg.execute === "query-status") {
          sock.write(`${JSON.stringify({ event: "RESUME", data: {} })}\n`);
          sock.write(`${JSON.stringify({ return: { status: "running" }, id: msg.id })}\n`);
        } else if (msg.execute === "bogus") {
          sock.write(`${JSON.stringify({ error: { class: "CommandNotFound", desc: "The command bogus has not been found" }, id: msg.id })}\n`);
        } else sock.write(`${JSON.stringify({ return: {}, id: msg.id })}\n`);
      },
      async (path) => {
        const qmp = await QmpClient.connect(path);
        const events: string[] = [];
        qmp.on("event", (e: { event: string }) => events.push(e.event));
        expect(await qmp.execute("query-status")).toEqual({ status: "running" });
        const err = await qmp.execute("bogus").catch((e: unknown) => e);
        expect(err).toBeInstanceOf(QmpError);
        expect((err as Error).message).toBe("QMP bogus: The command bogus has not been found");
        expect(events).toEqual(["RESUME"]);
        const closed = new Promise((r) => qmp.once("close", r));
        qmp.close();
        await closed;
        await expect(qmp.execute("query-status")).rejects.toThrow("connection closed");
      },
    );
  });

  it("fails pending commands when QEMU goes away", async () => {
    await withFakeQmp(
      (msg, sock) => (msg.execute === "qmp_capabilities" ? sock.write(`${JSON.stringify({ return: {}, id: msg.id })}\n`) : sock.destroy()),
      async (path) => {
        const qmp = await QmpClient.connect(path);
        await expect(qmp.execute("stop")).rejects.toThrow("QMP stop: QEMU closed the connection");
      },
    );
  });

  it("closes the connection with an error, not a throw, when the peer sends a line that is not JSON", async () => {
    await withFakeQmp(
      (msg, sock) => (msg.execute === "qmp_capabilities" ? sock.write(`${JSON.stringify({ return: {}, id: msg.id })}\n`) : sock.write("{not json\n")),
      async (path) => {
        const qmp = await QmpClient.connect(path);
        const closed = new Promise<Error | undefined>((r) => qmp.once("close", r));
        await expect(qmp.execute("query-status")).rejects.toThrow("QMP query-status: QMP peer sent a line that is not JSON");
        expect((await closed)?.message).toContain("not JSON");
        expect(qmp.isClosed).toBe(true);
      },
    );
  });

  it("closes the connection when a line passes its cap, without buffering the rest", async () => {
    let written = 0;
    await withFakeQmp(
      (msg, sock) => {
        if (msg.execute === "qmp_capabilities") return void sock.write(`${JSON.stringify({ return: {}, id: msg.id })}\n`);
        // An endless line: the client must hang up, not grow.
        const chunk = Buffer.alloc(64 * 1024, "x");
        const pump = () => {
          while (!sock.destroyed && sock.write(chunk)) written += chunk.length;
          if (!sock.destroyed) sock.once("drain", pump);
        };
        sock.on("error", () => undefined);
        pump();
      },
      async (path) => {
        const qmp = await QmpClient.connect(path, { maxLineBytes: 1024 * 1024 });
        await expect(qmp.execute("query-status")).rejects.toThrow("longer than 1048576 bytes");
        expect(written).toBeLessThan(64 * 1024 * 1024);
      },
    );
  });
});
