import { createHmac, timingSafeEqual } from "node:crypto";
import { request as httpRequest, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from "node:http";
import type { Socket } from "node:net";
import { ApiError, ERROR_CODES, type ErrorCode } from "../errors.ts";

/** How long a node's signature on a forwarded request is good for (clocks of a cluster's hosts agree within this). */
const SIGNATURE_TTL_MS = 60_000;
const AUTH_HEADER = "x-cocoon-node-auth";
const TENANT_HEADER = "x-cocoon-tenant";
/** Hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded; an upgrade's own are set again. */
const HOP_BY_HOP = new Set(["connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", AUTH_HEADER, TENANT_HEADER]);

/**
 * The internal channel between the nodes of a cluster (docs/cluster.md): a
 * node that receives a request for a VM another node runs forwards it there,
 * as is (method, path, headers including Host, body, a WebSocket upgrade),
 * signed with a key every node derives from the shared master key. The
 * signature covers the time, the tenant the forwarding node authenticated
 * and the request line; the receiving node takes the tenant from it (a
 * one-time terminal ticket was redeemed by the first node) and never
 * forwards a signed request again.
 */
export class NodeChannel {
  constructor(private readonly key: Buffer) {}

  private mac(at: string, tenantId: string, method: string, url: string): Buffer {
    return createHmac("sha256", this.key).update(`${at}\n${tenantId}\n${method}\n${url}`).digest();
  }

  /** The tenant a peer authenticated the request for ("" for an endpoint request), if it carries a valid signature. */
  verify(headers: IncomingHttpHeaders, method: string, url: string): { tenantId: string } | undefined {
    const auth = headers[AUTH_HEADER];
    const tenantId = headers[TENANT_HEADER] ?? "";
    if (typeof auth !== "string" || typeof tenantId !== "string") return undefined;
    const [at, mac] = auth.split(".");
    if (!at || !mac || !/^\d{1,15}$/.test(at) || Math.abs(Date.now() - Number(at)) > SIGNATURE_TTL_MS) return undefined;
    const given = Buffer.from(mac, "base64url");
    const expected = this.mac(at, tenantId, method, url);
    return given.length === expected.length && timingSafeEqual(given, expected) ? { tenantId } : undefined;
  }

  /** The headers that sign a request for `tenantId`, made at `atMs`. */
  signature(tenantId: string, method: string, url: string, atMs = Date.now()): Record<string, string> {
    const at = String(atMs);
    return { [AUTH_HEADER]: `${at}.${this.mac(at, tenantId, method, url).toString("base64url")}`, [TENANT_HEADER]: tenantId };
  }

  private headers(req: IncomingMessage, tenantId: string): Record<string, string | string[]> {
    const out: Record<string, string | string[]> = {};
    for (const [name, value] of Object.entries(req.headers)) if (value !== undefined && !HOP_BY_HOP.has(name)) out[name] = value;
    return { ...out, ...this.signature(tenantId, req.method ?? "GET", req.url ?? "/") };
  }

  /** Sends a JSON request for `tenantId` to the node at `nodeUrl` (a create offered to a peer); its answer as is. */
  async call(nodeUrl: string, tenantId: string, method: string, url: string, body: unknown): Promise<{ status: number; body: unknown }> {
    const res = await fetch(new URL(url, nodeUrl), {
      method,
      headers: { "content-type": "application/json", ...this.signature(tenantId, method, url) },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(300_000),
    });
    const text = await res.text();
    return { status: res.status, body: text ? (JSON.parse(text) as unknown) : undefined };
  }

  /**
   * Offers a create this node cannot take (`POST /v1/microvms` with `body`)
   * to `peers` in turn, best first: the first that admits it, under its own
   * row lock, makes it. Its answer as is (a 201, or its error), or undefined
   * when none had room. A peer never offers it on (it came over this channel).
   */
  async offerCreate(peers: string[], tenantId: string, body: unknown): Promise<{ status: number; body: unknown } | undefined> {
    for (const peer of peers) {
      const answer = await this.call(peer, tenantId, "POST", "/v1/microvms", body).catch(() => undefined);
      if (answer && answer.status !== 503) return answer;
    }
    return undefined;
  }

  /**
   * A peer's answer to an offered create, for a door that answers in its own
   * shape (the AWS one): the new VM's id, or the peer's error as an ApiError.
   */
  static createdId(answer: { status: number; body: unknown }): string {
    const body = answer.body as { microVmId?: unknown; error?: { code?: unknown; message?: unknown; details?: unknown } } | undefined;
    if (answer.status === 201 && typeof body?.microVmId === "string") return body.microVmId;
    const code = body?.error?.code;
    const message = typeof body?.error?.message === "string" ? body.error.message : `a peer answered the create with status ${answer.status}`;
    const details = typeof body?.error?.details === "object" && body.error.details !== null ? (body.error.details as Record<string, unknown>) : undefined;
    throw new ApiError(typeof code === "string" && code in ERROR_CODES ? (code as ErrorCode) : "Internal", message, details);
  }

  /** Forwards an HTTP request to the node at `nodeUrl` and streams its answer back. */
  forwardHttp(req: IncomingMessage, res: ServerResponse, nodeUrl: string, tenantId: string): Promise<void> {
    return new Promise((resolve) => {
      const upstream = httpRequest(new URL(req.url ?? "/", nodeUrl), { method: req.method, headers: this.headers(req, tenantId), setHost: false }, (answer) => {
        const headers: Record<string, string | string[]> = {};
        for (const [name, value] of Object.entries(answer.headers)) if (value !== undefined && !HOP_BY_HOP.has(name)) headers[name] = value;
        res.writeHead(answer.statusCode ?? 502, headers);
        answer.pipe(res);
        answer.once("error", () => res.destroy());
        res.once("close", () => {
          answer.destroy();
          resolve();
        });
      });
      upstream.once("error", (err) => {
        if (!res.headersSent) unreachable(res, nodeUrl, err);
        else res.destroy();
        resolve();
      });
      // The client gone: so is the forwarded request.
      res.once("close", () => upstream.destroy());
      req.pipe(upstream);
    });
  }

  /** Forwards a WebSocket upgrade: the peer's 101 and then the bytes both ways, or its refusal as is. */
  forwardUpgrade(req: IncomingMessage, client: Socket, nodeUrl: string, tenantId: string): void {
    const headers = { ...this.headers(req, tenantId), connection: "Upgrade", upgrade: req.headers.upgrade ?? "websocket" };
    const upstream = httpRequest(new URL(req.url ?? "/", nodeUrl), { method: req.method, headers, setHost: false });
    upstream.once("upgrade", (answer, peer: Socket, head: Buffer) => {
      client.write(`HTTP/1.1 101 Switching Protocols\r\n${rawHeaderLines(answer)}\r\n`);
      if (head.length > 0) client.write(head);
      peer.pipe(client).pipe(peer);
      const end = () => {
        peer.destroy();
        client.destroy();
      };
      peer.once("error", end).once("close", end);
      client.once("error", end).once("close", end);
    });
    upstream.once("response", (answer) => {
      // Refused (401, 404, 409…): the peer's answer as is, then the connection ends.
      client.write(`HTTP/1.1 ${answer.statusCode ?? 502} ${answer.statusMessage ?? ""}\r\n${rawHeaderLines(answer, ["connection", "transfer-encoding"])}connection: close\r\n\r\n`);
      answer.pipe(client);
    });
    upstream.once("error", () => client.destroy());
    client.once("close", () => upstream.destroy());
    upstream.end();
  }
}

function rawHeaderLines(answer: IncomingMessage, leaveOut: string[] = []): string {
  let lines = "";
  for (let i = 0; i + 1 < answer.rawHeaders.length; i += 2) {
    if (!leaveOut.includes(answer.rawHeaders[i]!.toLowerCase())) lines += `${answer.rawHeaders[i]}: ${answer.rawHeaders[i + 1]}\r\n`;
  }
  return lines;
}

/** The VM's node did not answer: 502 in the API's envelope. */
function unreachable(res: ServerResponse, nodeUrl: string, err: Error): void {
  const body = JSON.stringify({ error: { code: "BadGateway", message: `the microVM's node (${nodeUrl}) did not answer: ${err.message}` } });
  res.writeHead(502, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}
