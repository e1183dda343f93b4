import { randomBytes } from "node:crypto";
import { createServer, request as httpRequest, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket, { WebSocketServer } from "ws";
import { NodeChannel } from "../../src/router/node-channel.ts";

/*
 * The cluster's node channel on loopback: a "front" node forwards to an
 * "owner" node, both real HTTP servers; the owner checks the signature.
 */
const key = randomBytes(32);
const channel = new NodeChannel(key);
let owner: Server;
let front: Server;
let ownerUrl: string;
let frontUrl: string;
const seen: { tenant?: string; host?: string; body: string }[] = [];

const listen = async (server: Server) => {
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
};

beforeAll(async () => {
  owner = createServer((req, res) => {
    let body = "";
    req.on("data", (d: Buffer) => (body += d.toString()));
    req.on("end", () => {
      const verified = channel.verify(req.headers, req.method!, req.url!);
      seen.push({ tenant: verified?.tenantId, host: req.headers.host, body });
      res.writeHead(verified ? 200 : 401, { "content-type": "text/plain", "x-app": "owner" });
      res.end(verified ? `owner got ${req.method} ${req.url}: ${body}` : "unsigned");
    });
  });
  const wss = new WebSocketServer({ noServer: true });
  owner.on("upgrade", (req: IncomingMessage, socket: Socket, head: Buffer) => {
    if (!channel.verify(req.headers, req.method!, req.url!)) {
      socket.end("HTTP/1.1 401 Unauthorized\r\ncontent-length: 8\r\n\r\nunsigned");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => ws.on("message", (m) => ws.send(`echo:${String(m)}`)));
  });
  ownerUrl = await listen(owner);
  front = createServer((req, res) => void channel.forwardHttp(req, res, ownerUrl, "tnt-1"));
  front.on("upgrade", (req: IncomingMessage, socket: Socket) => channel.forwardUpgrade(req, socket, ownerUrl, "tnt-1"));
  frontUrl = await listen(front);
});

afterAll(() => {
  front.close();
  owner.close();
});

describe("the node channel", () => {
  it("forwards a request as is (method, path, Host, streamed body) with the tenant signed, and the answer back", async () => {
    const body = "x".repeat(200_000);
    // node:http, not fetch: fetch sets Host itself.
    const res = await new Promise<{ status: number; app: unknown; text: string }>((resolve, reject) => {
      const req = httpRequest(`${frontUrl}/v1/microvms/vm-1/files?path=/a`, { method: "PUT", headers: { host: "vm-1.vm.localhost:7070" } }, (answer) => {
        let text = "";
        answer.on("data", (d: Buffer) => (text += d.toString()));
        answer.on("end", () => resolve({ status: answer.statusCode!, app: answer.headers["x-app"], text }));
      });
      req.once("error", reject);
      req.end(body);
    });
    expect(res).toEqual({ status: 200, app: "owner", text: `owner got PUT /v1/microvms/vm-1/files?path=/a: ${body}` });
    expect(seen.at(-1)).toMatchObject({ tenant: "tnt-1", host: "vm-1.vm.localhost:7070" });
  });

  it("forwards a WebSocket upgrade", async () => {
    const ws = new WebSocket(`${frontUrl.replace("http", "ws")}/v1/microvms/vm-1/http/ws`);
    const echoed = await new Promise<string>((resolve, reject) => {
      ws.once("open", () => ws.send("hi"));
      ws.once("message", (m) => resolve(String(m)));
      ws.once("error", reject);
    });
    ws.close();
    expect(echoed).toBe("echo:hi");
  });

  it("refuses signatures that are forged, of another request or tenant, stale, or under another key", () => {
    const signed = (tenant: string, method: string, url: string, at?: number) => channel.signature(tenant, method, url, at);
    const good = signed("tnt-1", "POST", "/v1/microvms/vm-1/exec");
    expect(channel.verify(good, "POST", "/v1/microvms/vm-1/exec")).toEqual({ tenantId: "tnt-1" });
    expect(channel.verify({ ...good, "x-cocoon-tenant": "tnt-2" }, "POST", "/v1/microvms/vm-1/exec")).toBeUndefined();
    expect(channel.verify(good, "DELETE", "/v1/microvms/vm-1/exec")).toBeUndefined();
    expect(channel.verify(good, "POST", "/v1/microvms/vm-2/exec")).toBeUndefined();
    expect(channel.verify({ ...good, "x-cocoon-node-auth": `${Date.now()}.AAAA` }, "POST", "/v1/microvms/vm-1/exec")).toBeUndefined();
    expect(channel.verify({ "x-cocoon-node-auth": "garbage" }, "GET", "/")).toBeUndefined();
    const stale = signed("tnt-1", "GET", "/", Date.now() - 120_000);
    expect(channel.verify(stale, "GET", "/")).toBeUndefined();
    expect(new NodeChannel(randomBytes(32)).verify(good, "POST", "/v1/microvms/vm-1/exec")).toBeUndefined();
  });

  it("answers 502 in the API's envelope when the node does not answer", async () => {
    const dead = createServer((req, res) => void channel.forwardHttp(req, res, "http://127.0.0.1:1", ""));
    const deadUrl = await listen(dead);
    const res = await fetch(`${deadUrl}/v1/microvms/vm-1/exec`, { method: "POST", body: "{}" });
    expect(res.status).toBe(502);
    expect((await res.json()).error.code).toBe("BadGateway");
    dead.close();
  });
});
