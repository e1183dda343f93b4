import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { request as httpRequest, validateHeaderName, validateHeaderValue, type IncomingHttpHeaders, type IncomingMessage } from "node:http";
import type { Socket } from "node:net";
import { timingSafeEqual } from "node:crypto";
import WebSocket from "ws";
import { ApiError } from "../errors.ts";
import { checkPort, type GuestService } from "../lifecycle/guest.ts";
import type { MicroVmService } from "../lifecycle/microvms.ts";
import type { MicroVmRow } from "../store/schema.ts";
import type { AccessTokens } from "./access-tokens.ts";
import { BoundedSender, closeWebSocket } from "./websocket.ts";

/** The cookie `?cocoon_token=` sets, per VM, so a browser presents the token once. */
const cookieName = (id: string) => `cocoon_token_${id}`;
const TOKEN_PARAM = "cocoon_token";
/** The permission an API key needs to reach its tenant's endpoints. */
export const ENDPOINT_PERMISSION = "microvm:endpoint";
/** The largest WebSocket message relayed either way. */
const MAX_WS_MESSAGE_BYTES = 1024 * 1024;

/** Headers that describe one hop, not the message (RFC 9110 §7.6.1); never forwarded. */
const HOP_BY_HOP = new Set(["connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host"]);

/**
 * Response headers an app may not send on the path form, which is served on
 * the API's and the console's own origin: each acts on the whole origin, not
 * on the app's path (cookies, a service worker's scope, wiping the origin's
 * storage, HSTS and Alt-Svc for the host, network error and reporting
 * policies, client hints).
 */
const ORIGIN_WIDE = new Set([
  "set-cookie",
  "set-cookie2",
  "service-worker-allowed",
  "clear-site-data",
  "strict-transport-security",
  "alt-svc",
  "nel",
  "report-to",
  "reporting-endpoints",
  "accept-ch",
  "critical-ch",
  "origin-agent-cluster",
]);

/**
 * Path-form documents run in an opaque origin: scripts, forms, popups and
 * downloads work, but nothing of the API's origin (the console's stored key,
 * cookies, service workers) is theirs. `allow-same-origin` is what is left out.
 */
const PATH_FORM_CSP = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/** Where a request is addressed: VM, guest port (absent: the app port), and the form of the URL. */
export interface EndpointAddress {
  id: string;
  port?: number;
  form: "host" | "path";
  /** Path and query as sent to the endpoint, with Cocoon's token parameter still in it. */
  target: string;
}

/** A request the router has authorized: where it goes and how. */
export interface EndpointTarget {
  address: EndpointAddress;
  row: MicroVmRow;
  port: number;
  /** Path and query to send upstream (the token parameter removed). */
  path: string;
  /** Request headers for the app. */
  headers: Record<string, string | string[]>;
  /** Set when the request presented the VM's token as ?cocoon_token= (the cookie to set). */
  setCookie?: string;
}

type Credential = "public" | "token" | "query-token" | "cookie" | "access-token" | "api-key";

/**
 * The endpoint router: requests for `{id}.{domain}`, `{port}-{id}.{domain}`
 * or `/v1/microvms/{id}/http/…` reach a guest port (the app's, or the one
 * named). Access needs a credential of the VM: its endpoint token (Bearer,
 * `?cocoon_token=` once, then its cookie), an access token for the port
 * (`X-aws-proxy-auth` or Bearer), or an API key of its tenant with
 * `microvm:endpoint`; a public VM's app port needs none. Without one, the VM
 * does not exist (404, as for another tenant's VM anywhere). Every request
 * counts as activity, and a SUSPENDED VM with autoResume is resumed first.
 */
export class EndpointRouter {
  constructor(
    private readonly microvms: MicroVmService,
    private readonly guest: GuestService,
    private readonly accessTokens: AccessTokens,
    /** Whether `apiKey` is a live key of `tenantId` with ENDPOINT_PERMISSION (the API's key check). */
    private readonly apiKeyReaches: (apiKey: string, tenantId: string) => Promise<boolean>,
  ) {}

  /** Authorizes the request; returns where to send it. Nothing is resumed or connected yet. */
  async resolve(address: EndpointAddress, headers: IncomingHttpHeaders, method: string): Promise<EndpointTarget> {
    const { id } = address;
    const hidden = new ApiError(
      "NotFound",
      `microVM ${id} not found, or its endpoint needs a credential: its token (Authorization: Bearer, ?${TOKEN_PARAM}=), an access token (X-aws-proxy-auth) or an API key of its tenant`,
    );
    const { path, queryToken } = splitToken(address.target);
    if (!/^\/[\x21-\x7e]*$/.test(path)) throw new ApiError("ValidationError", "the request path must be printable ASCII (percent-encode the rest)", { field: "path" });
    const row = await this.microvms.getAnyTenant(id);
    if (!row || row.state === "TERMINATED") throw hidden;
    const appPort = row.app_port ?? undefined;
    const port = address.port ?? appPort;
    const credential = await this.credential(row, port, headers, queryToken);
    if (!credential) throw hidden;
    if (credential === "cookie") checkOrigin(headers, method, id);
    if (port === undefined) throw new ApiError("NotFound", `microVM ${id} serves no app (its image exposes no port; set appPort at create)`);
    checkPort(id, port);
    const usedAuthorization = credential === "token" || credential === "access-token" || credential === "api-key";
    return {
      address,
      row,
      port,
      path,
      headers: forwardHeaders(headers, { websocket: headers.upgrade?.toLowerCase() === "websocket", stripAuthorization: usedAuthorization }),
      setCookie: credential === "query-token" ? tokenCookie(row, address) : undefined,
    };
  }

  /** Proxies an HTTP request to the app (resuming its VM first if allowed), streaming both bodies. */
  async proxyHttp(target: EndpointTarget, req: FastifyRequest, reply: FastifyReply): Promise<void> {
    const { address, row } = target;
    reply.hijack();
    let socket: Socket;
    try {
      socket = await this.guest.connect(row.tenant_id, address.id, target.port);
    } catch (err) {
      return sendError(reply, err instanceof ApiError ? err : new ApiError("BadGateway", `microVM ${address.id}: port ${target.port} did not answer: ${(err as Error).message}`));
    }
    if (reply.raw.destroyed) return void socket.destroy(); // the client left while the VM resumed
    const upstream = httpRequest(
      { host: "127.0.0.1", port: target.port, method: req.method, path: target.path, headers: target.headers, createConnection: () => socket },
      (res) => {
        const head = responseHead(res, target);
        if (typeof head === "string") {
          res.destroy();
          return sendError(reply, new ApiError("BadGateway", `microVM ${address.id}: ${head}`));
        }
        reply.raw.writeHead(head.status, head.headers);
        res.pipe(reply.raw);
        res.on("error", () => reply.raw.destroy());
      },
    );
    upstream.on("error", (err) => sendError(reply, new ApiError("BadGateway", `microVM ${address.id}: the app did not answer: ${err.message}`)));
    reply.raw.on("close", () => {
      if (!reply.raw.writableFinished) upstream.destroy();
    });
    req.raw.pipe(upstream);
  }

  /** Relays a WebSocket to the app's WebSocket at the same path (resuming its VM first if allowed); both directions with back-pressure. */
  async proxyWebSocket(target: EndpointTarget, client: WebSocket): Promise<void> {
    const { address, row } = target;
    // Messages sent while the VM resumes wait in the client's socket, which is paused until the app accepted.
    client.pause();
    let socket: Socket;
    try {
      socket = await this.guest.connect(row.tenant_id, address.id, target.port);
    } catch (err) {
      return closeWebSocket(client, 1011, `microVM ${address.id}: ${(err as Error).message}`);
    }
    if (client.readyState !== WebSocket.OPEN) return void socket.destroy();
    const upstream = new WebSocket(`ws://127.0.0.1:${target.port}${target.path}`, {
      headers: target.headers,
      createConnection: () => socket,
      maxPayload: MAX_WS_MESSAGE_BYTES,
    });
    const toApp = new BoundedSender(upstream, client);
    const toClient = new BoundedSender(client, upstream);
    upstream.on("open", () => client.resume());
    client.on("message", (data: Buffer, isBinary: boolean) => {
      this.guest.touch(address.id);
      toApp.send(data, isBinary);
    });
    upstream.on("message", (data: Buffer, isBinary: boolean) => {
      this.guest.touch(address.id);
      toClient.send(data, isBinary);
    });
    upstream.on("close", (code: number, reason: Buffer) => closeWebSocket(client, code, reason.toString()));
    upstream.on("error", (err) => closeWebSocket(client, 1011, `the app's WebSocket at port ${target.port} ${target.path} failed: ${err.message}`));
    client.on("close", (code: number, reason: Buffer) => closeWebSocket(upstream, code, reason.toString()));
    client.on("error", () => upstream.terminate());
  }

  /** Which credential, if any, lets this request reach `port` of the VM. */
  private async credential(row: MicroVmRow, port: number | undefined, headers: IncomingHttpHeaders, queryToken: string | undefined): Promise<Credential | undefined> {
    const bearer = /^Bearer\s+(\S+)$/i.exec(headers.authorization ?? "")?.[1];
    const proxyAuth = headerValue(headers["x-aws-proxy-auth"]);
    if (bearer && sameSecret(bearer, row.endpoint_token)) return "token";
    if (queryToken && sameSecret(queryToken, row.endpoint_token)) return "query-token";
    if (port !== undefined) {
      for (const presented of [proxyAuth, bearer]) if (presented && this.accessTokens.verify(presented, row.id, port)) return "access-token";
    }
    if (bearer && (await this.apiKeyReaches(bearer, row.tenant_id))) return "api-key";
    // Every cookie of that name is tried: a same-site page may have planted a decoy beside the real one.
    for (const cookie of cookiesNamed(headers.cookie, cookieName(row.id))) if (sameSecret(cookie, row.endpoint_token)) return "cookie";
    // Public covers the app's port only; other ports always need a credential.
    if (row.endpoint_public && port !== undefined && port === row.app_port) return "public";
    return undefined;
  }
}

/**
 * A request authenticated by nothing but its cookie comes from a browser,
 * which may have been sent by another site's page: refused (403) when it
 * names another origin, or when it changes state and says it is cross-site.
 * The VM's own origin is the host the request was sent to (the VM's host on
 * the host form, the server's on the path form, whose documents are
 * sandboxed and so send `Origin: null`).
 */
function checkOrigin(headers: IncomingHttpHeaders, method: string, id: string): void {
  const origin = headerValue(headers.origin);
  const site = headerValue(headers["sec-fetch-site"]);
  const ownOrigin = (() => {
    try {
      return origin !== undefined && new URL(origin).host === headers.host;
    } catch {
      return false;
    }
  })();
  const stateChanging = !["GET", "HEAD", "OPTIONS"].includes(method) || headers.upgrade !== undefined;
  if ((origin !== undefined && !ownOrigin) || (stateChanging && site !== undefined && site !== "same-origin" && site !== "none")) {
    throw new ApiError("Forbidden", `microVM ${id}'s endpoint cookie is only accepted from the endpoint's own origin (Origin: ${String(origin ?? site).slice(0, 100)})`);
  }
}

/** The status and headers to send the client, or why the app's answer is not passed on. */
function responseHead(res: IncomingMessage, target: EndpointTarget): { status: number; headers: Record<string, string | string[]> } | string {
  const status = res.statusCode ?? 0;
  if (!Number.isInteger(status) || status < 200 || status > 599) return `the app answered an invalid status ${status}`;
  const out: Record<string, string | string[]> = {};
  const pathForm = target.address.form === "path";
  for (const [name, value] of Object.entries(res.headers)) {
    if (value === undefined || HOP_BY_HOP.has(name) || (pathForm && ORIGIN_WIDE.has(name))) continue;
    try {
      validateHeaderName(name);
      for (const v of [value].flat()) validateHeaderValue(name, v);
    } catch {
      return `the app answered a malformed header ${JSON.stringify(name.slice(0, 64))}`;
    }
    out[name] = value;
  }
  if (!pathForm && out["set-cookie"]) out["set-cookie"] = appCookies([out["set-cookie"]].flat());
  if (pathForm) out["content-security-policy"] = [...[out["content-security-policy"] ?? []].flat(), PATH_FORM_CSP];
  if (target.setCookie) out["set-cookie"] = [...[out["set-cookie"] ?? []].flat(), target.setCookie];
  return { status, headers: out };
}

/**
 * An app's cookies on its own host: host-only (a `Domain` would share them
 * with every VM under the endpoint domain), and never one of Cocoon's names.
 */
function appCookies(setCookies: string[]): string[] {
  return setCookies
    .filter((c) => !c.trim().toLowerCase().startsWith("cocoon_token"))
    .map((c) =>
      c
        .split(";")
        .filter((attr, i) => i === 0 || !/^\s*domain\s*=/i.test(attr))
        .join(";"),
    );
}

/** The VM's token as a cookie, scoped to the VM: host-only on its host, its path on the path form. */
function tokenCookie(row: MicroVmRow, address: EndpointAddress): string {
  const path = address.form === "path" ? `/v1/microvms/${row.id}/http/` : "/";
  return `${cookieName(row.id)}=${row.endpoint_token}; Path=${path}; HttpOnly; SameSite=Strict`;
}

/** An error in the API's envelope on a hijacked reply; a response already begun is cut instead. */
function sendError(reply: FastifyReply, err: ApiError): void {
  const res = reply.raw;
  if (res.headersSent) return void res.destroy();
  const body = JSON.stringify({ error: { code: err.code, message: err.message, ...(err.details ? { details: err.details } : {}) } });
  res.writeHead(err.status, { "content-type": "application/json; charset=utf-8", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

function sameSecret(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

function headerValue(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v[0] : v;
}

function cookiesNamed(header: string | undefined, name: string): string[] {
  const out: string[] = [];
  for (const part of (header ?? "").split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === name) out.push(part.slice(eq + 1).trim());
  }
  return out;
}

/**
 * The target without Cocoon's `cocoon_token` parameter, and that parameter's
 * value. Other parameters are kept byte for byte; none is decoded but ours.
 */
export function splitToken(target: string): { path: string; queryToken?: string } {
  const q = target.indexOf("?");
  if (q < 0) return { path: target };
  let queryToken: string | undefined;
  const kept = target
    .slice(q + 1)
    .split("&")
    .filter((pair) => {
      const eq = pair.indexOf("=");
      const name = eq < 0 ? pair : pair.slice(0, eq);
      if (name !== TOKEN_PARAM) return true;
      try {
        queryToken = decodeURIComponent(pair.slice(eq + 1).replace(/\+/g, " "));
      } catch {
        // a bad percent-encoding is no token
      }
      return false;
    });
  return { path: `${target.slice(0, q)}${kept.length ? `?${kept.join("&")}` : ""}`, queryToken };
}

/** Request headers for the app: no hop-by-hop headers, no Cocoon credentials (the Authorization that authenticated, token cookies, access tokens), X-Forwarded-* added. */
function forwardHeaders(headers: IncomingHttpHeaders, opts: { websocket: boolean; stripAuthorization: boolean }): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const [k, v] of Object.entries(headers)) {
    if (v === undefined || HOP_BY_HOP.has(k) || k === "x-aws-proxy-auth" || k === "cookie") continue;
    if (k === "authorization" && opts.stripAuthorization) continue;
    if (opts.websocket && k.startsWith("sec-websocket")) continue;
    out[k] = v;
  }
  // The app keeps its own cookies; Cocoon's token cookies stay with Cocoon.
  const cookies = String(headers.cookie ?? "")
    .split(";")
    .map((c) => c.trim())
    .filter((c) => c && !c.startsWith("cocoon_token_"));
  if (cookies.length) out.cookie = cookies.join("; ");
  if (headers.host) {
    out["x-forwarded-host"] = headers.host;
    out["x-forwarded-proto"] = "http";
  }
  return out;
}

declare module "fastify" {
  interface FastifyRequest {
    /** Set by the endpoint routes' preHandler: where the request goes. */
    endpoint?: EndpointTarget;
  }
}

/** The pattern of endpoint hosts: `{id}.{domain}` and `{port}-{id}.{domain}`, with an optional `:port`. */
export function endpointHostPattern(domain: string): RegExp {
  return new RegExp(`^(?:(\\d{1,5})-)?(vm-[0-9a-f]+)\\.${domain.replace(/\./g, "\\.")}(?::\\d+)?$`, "i");
}

/** Registers the endpoint routes: `{id}.{domain}` and `{port}-{id}.{domain}` hosts, and `/v1/microvms/{id}/http/…`. */
export async function registerEndpointRoutes(app: FastifyInstance, router: EndpointRouter, domain: string): Promise<void> {
  const hostPattern = endpointHostPattern(domain);
  await app.register(async (scope) => {
    // Bodies go to the app untouched: no parsing in this scope.
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser("*", (_req, _payload, done) => done(null));
    scope.decorateRequest("endpoint", undefined);
    /** GET (HTTP or a WebSocket upgrade) and every other method, for one URL pattern. */
    const proxy = (url: string, address: (req: FastifyRequest) => EndpointAddress, constraints?: { host: RegExp }) => {
      const common = {
        url,
        schema: { hide: true },
        ...(constraints ? { constraints } : {}),
        // Authorized before anything is answered: a refusal is an HTTP error, also for an upgrade.
        preHandler: async (req: FastifyRequest) => {
          req.endpoint = await router.resolve(address(req), req.headers, req.method);
        },
        handler: async (req: FastifyRequest, reply: FastifyReply) => router.proxyHttp(req.endpoint!, req, reply),
      };
      // handler + wsHandler (without `websocket: true`): plain GETs and upgrades on one route.
      scope.route({ ...common, method: "GET", config: { upgrade: true }, wsHandler: (socket: WebSocket, req: FastifyRequest) => router.proxyWebSocket(req.endpoint!, socket) });
      scope.route({ ...common, method: ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] }); // HEAD comes with GET
    };
    proxy("/v1/microvms/:id/http/*", (req) => {
      const { id } = req.params as { id: string };
      // From the raw URL, not the decoded parameter: the app gets the path as the client encoded it.
      const target = /^\/v1\/microvms\/[^/?]*\/http(\/.*)$/.exec(req.url)?.[1] ?? "/";
      return { id, form: "path", target };
    });
    proxy(
      "/*",
      (req) => {
        const [, port, id] = hostPattern.exec(req.headers.host ?? "")!;
        if (port !== undefined && (Number(port) < 1 || Number(port) > 65535)) throw new ApiError("NotFound", `no port ${port}: ports are 1–65535`);
        return { id: id!.toLowerCase(), port: port === undefined ? undefined : Number(port), form: "host", target: req.url };
      },
      { host: hostPattern },
    );
  });
}
