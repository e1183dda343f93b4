import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { request as httpRequest, type IncomingHttpHeaders } from "node:http";
import { timingSafeEqual } from "node:crypto";
import WebSocket from "ws";
import { ApiError } from "../errors.ts";
import type { MicroVmService } from "../lifecycle/microvms.ts";
import type { MicroVmRow } from "../store/schema.ts";
import type { Db } from "../store/db.ts";
import { findLiveKey } from "../store/tenants.ts";
import type { AccessTokens } from "./access-tokens.ts";

/** The cookie `?cocoon_token=` sets, per VM, so a browser presents the token once. */
const cookieName = (id: string) => `cocoon_token_${id}`;
const TOKEN_PARAM = "cocoon_token";
/** AWS Lambda MicroVMs' header for an access token limited to ports and an expiry (router/access-tokens.ts). */
const PROXY_AUTH_HEADER = "x-aws-proxy-auth";

/** Headers that describe one hop, not the message (RFC 9110 §7.6.1); never forwarded. */
const HOP_BY_HOP = new Set(["connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host"]);

export interface EndpointTarget {
  row: MicroVmRow;
  hostPort: number;
  /** Path and query to send upstream (the token parameter removed). */
  path: string;
  /** Set when the request presented the token as ?cocoon_token= (the cookie to set). */
  setCookie?: string;
}

/**
 * The endpoint router: requests for `{id}.{domain}` or `/v1/microvms/{id}/http/…`
 * reach the VM's app port. Access needs the VM's endpoint token (Bearer,
 * `?cocoon_token=` once, then its cookie) or an API key of the VM's tenant,
 * unless the VM is public. Every request counts as activity, and a SUSPENDED
 * VM with autoResume is resumed first: the caller only sees a slower answer.
 */
export class EndpointRouter {
  constructor(
    private readonly db: Db,
    private readonly microvms: MicroVmService,
    private readonly accessTokens?: AccessTokens,
  ) {}

  /**
   * Authorizes the request and makes sure the VM runs; returns where to send
   * it. `port` is a guest port named by a `{port}-{id}` host; default the app
   * port. An `X-aws-proxy-auth` token opens only its ports; the VM's token and
   * its tenant's API keys open every port; `endpoint.public` opens the app port.
   */
  async resolve(id: string, upstreamPath: string, headers: IncomingHttpHeaders, port?: number): Promise<EndpointTarget> {
    const row = await this.microvms.getAnyTenant(id);
    if (!row || row.state === "TERMINATED") throw new ApiError("NotFound", `microVM ${id} not found`);
    const url = new URL(upstreamPath, "http://x");
    const queryToken = url.searchParams.get(TOKEN_PARAM) ?? undefined;
    url.searchParams.delete(TOKEN_PARAM);
    const guestPort = port ?? row.app_port;
    const publicPort = row.endpoint_public === 1 && guestPort === row.app_port;
    if (!publicPort && !(await this.authorized(row, headers, queryToken, guestPort))) {
      throw new ApiError("Unauthorized", `microVM ${id}'s endpoint needs its token (Authorization: Bearer, or ?${TOKEN_PARAM}=), an ${PROXY_AUTH_HEADER} token for this port, or an API key of its tenant`);
    }
    if (guestPort === null) throw new ApiError("NotFound", `microVM ${id} serves no app (its image exposes no port; set appPort at create)`);
    const vm = await this.microvms.runningVm(row.tenant_id, id, "serve a request to");
    const hostPort = vm.hostPort(guestPort);
    if (!hostPort) throw new ApiError("NotFound", `microVM ${id} does not forward port ${guestPort}`);
    return {
      row,
      hostPort,
      path: `${url.pathname}${url.search}`,
      setCookie: queryToken ? `${cookieName(id)}=${queryToken}; Path=/; HttpOnly; SameSite=Lax` : undefined,
    };
  }

  /** Proxies an HTTP request to the app, streaming both bodies. */
  async proxyHttp(id: string, upstreamPath: string, req: FastifyRequest, reply: FastifyReply, port?: number): Promise<void> {
    const target = await this.resolve(id, upstreamPath, req.headers, port);
    const headers = forwardHeaders(req.headers, req.headers.host);
    reply.hijack();
    const upstream = httpRequest({ host: "127.0.0.1", port: target.hostPort, method: req.method, path: target.path, headers }, (res) => {
      const out: Record<string, string | string[]> = {};
      for (const [k, v] of Object.entries(res.headers)) if (v !== undefined && !HOP_BY_HOP.has(k)) out[k] = v;
      if (target.setCookie) out["set-cookie"] = [...[out["set-cookie"] ?? []].flat(), target.setCookie];
      reply.raw.writeHead(res.statusCode ?? 502, out);
      res.pipe(reply.raw);
    });
    upstream.on("error", (err) => {
      if (reply.raw.headersSent) reply.raw.destroy(err);
      else {
        reply.raw.writeHead(502, { "content-type": "application/json" });
        reply.raw.end(JSON.stringify({ error: { code: "BadGateway", message: `the app in microVM ${id} did not answer: ${err.message}` } }));
      }
    });
    req.raw.pipe(upstream);
  }

  /** Relays a WebSocket to the app's WebSocket at the same path. */
  async proxyWebSocket(id: string, upstreamPath: string, client: WebSocket, req: FastifyRequest, port?: number): Promise<void> {
    // Messages may arrive while the VM resumes: hold them until upstream is open.
    const pending: [WebSocket.RawData, boolean][] = [];
    let upstream: WebSocket | undefined;
    client.on("message", (data, isBinary) => (upstream?.readyState === WebSocket.OPEN ? upstream.send(data, { binary: isBinary }) : pending.push([data, isBinary])));
    try {
      const target = await this.resolve(id, upstreamPath, req.headers, port);
      upstream = new WebSocket(`ws://127.0.0.1:${target.hostPort}${target.path}`, { headers: forwardHeaders(req.headers, req.headers.host, true) });
    } catch (err) {
      client.close(1008, (err as Error).message.slice(0, 120));
      return;
    }
    const up = upstream;
    up.on("open", () => {
      for (const [data, isBinary] of pending.splice(0)) up.send(data, { binary: isBinary });
    });
    up.on("message", (data, isBinary) => client.send(data, { binary: isBinary }));
    up.on("close", (code) => client.close(code === 1005 ? 1000 : code));
    up.on("error", () => client.close(1011));
    client.on("close", () => up.close());
  }

  private async authorized(row: MicroVmRow, headers: IncomingHttpHeaders, queryToken: string | undefined, guestPort: number | null): Promise<boolean> {
    const proxyAuth = headers[PROXY_AUTH_HEADER];
    if (typeof proxyAuth === "string" && guestPort !== null && this.accessTokens?.verify(proxyAuth, row.id, guestPort)) return true;
    const bearer = /^Bearer\s+(\S+)$/i.exec(headers.authorization ?? "")?.[1];
    const cookie = parseCookies(headers.cookie)[cookieName(row.id)];
    for (const presented of [bearer, queryToken, cookie]) if (presented && sameSecret(presented, row.endpoint_token)) return true;
    if (!bearer) return false;
    const key = await findLiveKey(this.db, bearer);
    return key?.tenant_id === row.tenant_id;
  }
}

function sameSecret(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

function parseCookies(header: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of (header ?? "").split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0) out[part.slice(0, eq).trim()] = part.slice(eq + 1).trim();
  }
  return out;
}

/** Request headers for the app: no hop-by-hop headers, no Cocoon credentials (Authorization, token cookie), X-Forwarded-* added. */
function forwardHeaders(headers: IncomingHttpHeaders, host: string | undefined, websocket = false): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const [k, v] of Object.entries(headers)) {
    if (v === undefined || HOP_BY_HOP.has(k) || k === "authorization" || k === PROXY_AUTH_HEADER) continue;
    if (websocket && k.startsWith("sec-websocket")) continue;
    out[k] = v;
  }
  // The app keeps its own cookies; Cocoon's token cookies stay with Cocoon.
  const cookies = String(headers.cookie ?? "")
    .split(";")
    .map((c) => c.trim())
    .filter((c) => c && !c.startsWith("cocoon_token_"));
  if (cookies.length) out.cookie = cookies.join("; ");
  else delete out.cookie;
  if (host) {
    out["x-forwarded-host"] = host;
    out["x-forwarded-proto"] = "http";
  }
  return out;
}

/** Registers the endpoint routes: `{id}.{domain}` hosts and `/v1/microvms/{id}/http/…`. */
export async function registerEndpointRoutes(app: FastifyInstance, router: EndpointRouter, domain: string): Promise<void> {
  await app.register(async (scope) => {
    // Bodies go to the app untouched: no parsing in this scope.
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser("*", (_req, _payload, done) => done(null));
    /** GET (HTTP or a WebSocket upgrade) and every other method, for one URL pattern. */
    const proxy = (url: string, target: (req: FastifyRequest) => { id: string; path: string; port?: number }, constraints?: { host: RegExp }) => {
      const http = (req: FastifyRequest, reply: FastifyReply) => router.proxyHttp(target(req).id, target(req).path, req, reply, target(req).port);
      const common = { url, schema: { hide: true }, ...(constraints ? { constraints } : {}) };
      scope.route({
        ...common,
        method: "GET",
        // handler + wsHandler (without `websocket: true`): plain GETs and upgrades on one route.
        handler: http,
        wsHandler: (socket: WebSocket, req: FastifyRequest) => void router.proxyWebSocket(target(req).id, target(req).path, socket, req, target(req).port),
      });
      scope.route({ ...common, method: ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"], handler: http }); // HEAD comes with GET
    };
    proxy("/v1/microvms/:id/http/*", (req) => {
      const { id, "*": rest } = req.params as { id: string; "*": string };
      return { id, path: `/${rest ?? ""}${queryOf(req.url)}` };
    });
    // `{id}.{domain}` reaches the app port, `{port}-{id}.{domain}` that guest port.
    const hostPattern = new RegExp(`^(?:([1-9]\\d{0,4})-)?(vm-[0-9a-f]+)\\.${domain.replace(/\./g, "\\.")}(:\\d+)?$`);
    proxy(
      "/*",
      (req) => {
        const m = hostPattern.exec(req.headers.host ?? "")!;
        return { id: m[2]!, path: req.url, port: m[1] ? Number(m[1]) : undefined };
      },
      { host: hostPattern },
    );
  });
}

const queryOf = (url: string) => (url.includes("?") ? url.slice(url.indexOf("?")) : "");
