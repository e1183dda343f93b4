import swagger from "@fastify/swagger";
import websocket from "@fastify/websocket";
import type { TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import { Ajv } from "ajv";
import { handleMcpHttpRequest, loopbackUrl } from "@cocoon/mcp";
import Fastify, { type FastifyError, type FastifyReply, type FastifyRequest } from "fastify";
import { AsyncLocalStorage } from "node:async_hooks";
import type { IncomingMessage } from "node:http";
import { randomUUID } from "node:crypto";
import type { Socket } from "node:net";
import type { Writable } from "node:stream";
import { ApiError, ERROR_CODES, type ErrorCode } from "../errors.ts";
import { toApiError } from "./error-mapping.ts";
import { API_SCHEMAS, ref } from "./schemas.ts";
import { GuestService } from "../lifecycle/guest.ts";
import type { MicroVmService } from "../lifecycle/microvms.ts";
import type { Db } from "../store/db.ts";
import type { ServerSecrets } from "../store/secrets.ts";
import type { ServerMetrics } from "../telemetry/metrics.ts";
import type { VmSampler } from "../telemetry/vm-samples.ts";
import type { Accelerator } from "../vmm/qemu.ts";
import { AccessTokens } from "../router/access-tokens.ts";
import { ENDPOINT_PERMISSION, endpointHostPattern, EndpointRouter, registerEndpointRoutes } from "../router/endpoint.ts";
import type { NodeChannel } from "../router/node-channel.ts";
import { checkUpgradeHeaders } from "../router/websocket.ts";
import { authenticate, keyOfTenantGrants } from "./auth.ts";
import type { ImageService } from "../images/service.ts";
import { registerAwsApi } from "./aws/index.ts";
import { parseArn } from "./aws/protocol.ts";
import { registerClusterRoutes } from "./routes/cluster.ts";
import { registerConnectorRoutes } from "./routes/connectors.ts";
import { registerConsoleRoutes } from "./routes/console.ts";
import { registerImageRoutes } from "./routes/images.ts";
import { OutputBudget } from "./output-budget.ts";
import { registerKeyRoutes } from "./routes/keys.ts";
import { registerMicroVmRoutes } from "./routes/microvms.ts";
import { registerObserveRoutes } from "./routes/observe.ts";
import { registerTerminalRoutes } from "./routes/terminal.ts";
import { TerminalTickets } from "./tickets.ts";

export const VERSION = "0.1.0";

/** JSON and text bodies; file uploads stream and have their own limit (routes/microvms.ts). */
export const BODY_LIMIT_BYTES = 1024 * 1024;

/**
 * How long a client may take to send a request (slow-loris uploads end
 * there). Headers must be complete within `headersMs`; the whole request,
 * body included, within `requestMs` (uploads larger than that needs at the
 * client's rate are cut: 15 min is 9 MB/s for the 8 GiB upload limit).
 * Answers may take as long as they take (a long exec, a WebSocket).
 */
export interface ApiTimeouts {
  headersMs: number;
  requestMs: number;
}
export const DEFAULT_TIMEOUTS: ApiTimeouts = { headersMs: 30_000, requestMs: 15 * 60_000 };

export interface ApiDeps {
  db: Db;
  microvms: MicroVmService;
  /** The server's master key (store/secrets.ts): seals API key secrets for SigV4, signs endpoint and shell tokens. */
  secrets: ServerSecrets;
  accelerator: Accelerator;
  /** The QEMU jail's cgroup version; absent when QEMU runs unjailed (COCOON_JAIL=off, or not root). */
  jail?: { cgroupVersion: 1 | 2 };
  metrics: ServerMetrics;
  sampler: VmSampler;
  /** MicroVM Images (Dockerfile builds); without it only the built-in `base` exists. */
  images?: ImageService;
  /** Cluster (docs/cluster.md): the signed channel requests for another node's VM are forwarded over. */
  nodeChannel?: NodeChannel;
  /** Serve /metrics without an admin key (--metrics-public). */
  metricsPublic?: boolean;
  /** Endpoints are `http://{id}.{endpointDomain}:{port}/` (default vm.localhost). */
  endpointDomain?: string;
  /** Request logging (pino, JSON lines), to `logStream` (default stdout). */
  logger?: boolean;
  logStream?: Writable;
  timeouts?: Partial<ApiTimeouts>;
  /** What buffered exec answers may hold in memory at once (output-budget.ts; default 256 MiB). */
  execOutputBudgetBytes?: number;
  /** Check every JSON answer against its documented schema (schemas.ts); one that differs is a 500 naming the difference. The tests' servers do. */
  checkAnswers?: boolean;
}

export type Api = ReturnType<typeof createFastify>;

/** Query parameters that carry credentials: logged as [REDACTED]. */
const SECRET_PARAMS = new Set(["access_token", "cocoon_token", "ticket", "token"]);
/** Headers that carry credentials, wherever a log line holds request headers. */
const SECRET_HEADERS = ["authorization", "cookie", "x-aws-proxy-auth", "proxy-authorization"];

/** The request whose handling is running, for a last-resort handler's log line (src/server/main.ts). */
const requestContext = new AsyncLocalStorage<{ requestId: string }>();
export const currentRequestId = (): string | undefined => requestContext.getStore()?.requestId;

function createFastify(deps: Pick<ApiDeps, "logger" | "logStream" | "timeouts">) {
  const timeouts = { ...DEFAULT_TIMEOUTS, ...deps.timeouts };
  return Fastify({
    logger: deps.logger
      ? {
          level: "info",
          ...(deps.logStream ? { stream: deps.logStream } : {}),
          serializers: { req: (req: FastifyRequest) => ({ method: req.method, url: redactUrl(req.url), host: req.host, remoteAddress: req.ip }) },
          redact: { paths: SECRET_HEADERS.flatMap((h) => [`req.headers["${h}"]`, `headers["${h}"]`]), censor: "[REDACTED]" },
        }
      : false,
    bodyLimit: BODY_LIMIT_BYTES,
    // A client's x-request-id names its request in our log if it is a plain token; anything else gets our own.
    genReqId: (req: IncomingMessage) => {
      const id = req.headers["x-request-id"];
      return typeof id === "string" && /^[A-Za-z0-9._:-]{1,128}$/.test(id) ? id : randomUUID();
    },
    requestTimeout: timeouts.requestMs,
    http: {
      headersTimeout: timeouts.headersMs,
      requestTimeout: timeouts.requestMs,
      // How often Node looks for requests past those limits.
      connectionsCheckingInterval: Math.min(30_000, Math.max(250, Math.floor(timeouts.headersMs / 4))),
    },
    // Errors Fastify raises before routing (a path with a bad percent-encoding, a too-long parameter).
    frameworkErrors: (err, request, reply) => {
      const { status, body } = toErrorResponse(err as FastifyError);
      // An upgrade's socket left Node's HTTP handling: once answered, nothing else would close it.
      if (request.headers.upgrade !== undefined) reply.raw.once("finish", () => request.raw.socket.end());
      void (reply as unknown as FastifyReply).status(status).send(body);
    },
    // Errors Node's HTTP parser raises before Fastify sees a request: answered on the raw socket, in the envelope.
    clientErrorHandler: (err: Error & { code?: string }, socket: Socket) => {
      if (err.code === "ECONNRESET" || socket.destroyed) return;
      const [status, code, message] =
        err.code === "ERR_HTTP_REQUEST_TIMEOUT"
          ? [408, "RequestTimeout", `the request did not arrive within the server's limit (headers ${timeouts.headersMs / 1000} s, whole request ${timeouts.requestMs / 1000} s)`]
          : err.code === "HPE_HEADER_OVERFLOW"
            ? [431, "HeadersTooLarge", "the request's headers exceed 16 KiB"]
            : [400, "ValidationError", `malformed HTTP request (${err.code ?? "parse error"})`];
      const body = JSON.stringify(errorBody(code as ErrorCode, message));
      // Only if nothing of a response was written on this connection yet.
      if (socket.writable && socket.bytesWritten === 0) {
        socket.write(`HTTP/1.1 ${status} ${code}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
      }
      socket.destroy();
    },
  }).withTypeProvider<TypeBoxTypeProvider>();
}

/** The HTTP API of docs/api.md: routes only translate HTTP to lifecycle calls and back. */
export async function buildApi(deps: ApiDeps): Promise<Api> {
  const app = createFastify(deps);
  // The answers' shapes are named schemas (schemas.ts), components of the served document under their own names.
  for (const schema of API_SCHEMAS) app.addSchema(schema);
  await app.register(swagger, {
    openapi: {
      info: {
        title: "Cocoon API",
        version: VERSION,
        description: "The /v1 HTTP API (docs/api.md). Errors are `{\"error\": {code, message, details?}}` (ErrorEnvelope); lists are newest first with a `nextToken` cursor.",
      },
      components: { securitySchemes: { apiKey: { type: "http", scheme: "bearer" } } },
      security: [{ apiKey: [] }],
    },
    refResolver: { buildLocalReference: (json, _baseUri, _fragment, i) => (typeof json.$id === "string" ? json.$id : `def-${i}`) },
  });
  // Response schemas document the answers; the views are typed by them (schemas.ts), and answers are sent as built
  // (checked against them first when asked: the tests prove the document true).
  const answers = deps.checkAnswers ? new Ajv({ strict: false, validateFormats: false, allErrors: false, schemas: API_SCHEMAS }) : undefined;
  app.setSerializerCompiler(({ schema, method, url, httpStatus }) => {
    if (!answers) return (data) => JSON.stringify(data);
    const check = answers.compile(schema);
    return (data) => {
      if (!check(data)) throw new ApiError("Internal", `the answer of ${method} ${url} (${httpStatus}) is not as documented: ${answers.errorsText(check.errors)}`);
      return JSON.stringify(data);
    };
  });
  // Every documented route may answer an error, in the envelope.
  app.addHook("onRoute", (route) => {
    if (!route.url.startsWith("/v1/") || (route.schema as { hide?: boolean } | undefined)?.hide) return;
    const schema = (route.schema ??= {}) as { response?: Record<string, unknown> };
    schema.response = { ...schema.response, "4XX": ref("ErrorEnvelope"), "5XX": ref("ErrorEnvelope") };
  });
  // Query strings and params arrive as text and are coerced ("10" → 10); JSON
  // bodies are not: coercion would turn ["ls"] into "ls" (argv into a shell string).
  const coercing = new Ajv({ coerceTypes: true, useDefaults: true, removeAdditional: false });
  const strict = new Ajv({ coerceTypes: false, useDefaults: true, removeAdditional: false });
  app.setValidatorCompiler(({ schema, httpPart }) => (httpPart === "body" ? strict : coercing).compile(schema));
  app.setErrorHandler((err: FastifyError, request, reply) => {
    const { status, body } = toErrorResponse(err);
    if (status >= 500) request.log.error({ err }, "request failed");
    void reply.status(status).send(body);
  });
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send(errorBody("NotFound", `no route ${request.method} ${request.url.split("?")[0]!.slice(0, 200)}`));
  });
  // Many clients send Content-Type: application/json on every request: an empty body is no body.
  const json = app.getDefaultJsonParser("error", "error");
  app.addContentTypeParser("application/json", { parseAs: "string" }, (request, body, done) =>
    (body as string).trim() === "" ? done(null, undefined) : json(request, body as string, done),
  );
  app.decorateRequest("tenantId", "");
  app.decorateRequest("forwarded", false);
  await app.register(websocket, { options: { maxPayload: 1024 * 1024 } });
  const tickets = new TerminalTickets();
  app.addHook("onRequest", (request, _reply, done) => requestContext.run({ requestId: request.id }, done));
  app.addHook("onRequest", async (request, reply) => {
    void reply.header("x-request-id", request.id);
    const config = request.routeOptions.config as { permission?: string; ticketed?: boolean; upgrade?: boolean };
    // An upgrade is answered in the envelope like any request until it is accepted.
    if (request.ws) {
      if (!config.upgrade) throw new ApiError("ValidationError", `${request.method} ${request.url.split("?")[0]!.slice(0, 200)} is not a WebSocket route`);
      checkUpgradeHeaders(request.headers);
    }
    // Forwarded by a peer node (cluster): authenticated there, the tenant is in its signature; one
    // that names none (a terminal ticket, redeemable only here) is authenticated here like any request.
    const forwarded = deps.nodeChannel?.verify(request.headers, request.method, request.url);
    if (forwarded) request.forwarded = true;
    if (forwarded && (!config.permission || forwarded.tenantId)) {
      request.tenantId = forwarded.tenantId;
      return;
    }
    if (!config.permission) return;
    // Browsers cannot set headers on a WebSocket: those upgrades carry a one-time ticket (or, kept
    // for older clients, the key itself as ?access_token=).
    const query = request.query as { access_token?: string; ticket?: string };
    const upgrade = request.headers.upgrade?.toLowerCase() === "websocket";
    if (upgrade && config.ticketed && typeof query.ticket === "string") {
      const id = (request.params as { id?: string }).id ?? "";
      // Cluster: the ticket was issued by the VM's node (its ticket route is forwarded there): it is redeemed there.
      if (deps.nodeChannel && !request.forwarded && (await deps.microvms.ownerUrl(id))) return;
      request.tenantId = tickets.redeem(query.ticket, id);
      return;
    }
    const token = upgrade && typeof query.access_token === "string" ? query.access_token : undefined;
    request.tenantId = await authenticate(deps.db, request.headers.authorization ?? (token ? `Bearer ${token}` : undefined), config.permission);
  });
  if (deps.nodeChannel) forwardToOwners(app, deps.nodeChannel, deps.microvms, endpointHostPattern(deps.endpointDomain ?? "vm.localhost"));

  app.get("/v1/health", { schema: { security: [], response: { 200: ref("Health") } } }, async () => ({
    status: "ok",
    accelerator: deps.accelerator,
    jail: deps.jail ? { enabled: true, cgroupVersion: deps.jail.cgroupVersion } : { enabled: false },
    version: VERSION,
  }));
  app.get("/v1/openapi.json", { schema: { hide: true } }, async () => app.swagger());
  registerKeyRoutes(app, deps.db, deps.secrets);
  if (deps.nodeChannel) registerClusterRoutes(app, deps.db);
  if (deps.images) await registerImageRoutes(app, deps.images, deps.microvms, deps.db);
  const domain = deps.endpointDomain ?? "vm.localhost";
  const endpointUrl = (id: string) => {
    const address = app.server.address();
    return `http://${id}.${domain}:${typeof address === "object" && address ? address.port : 7070}/`;
  };
  const guest = new GuestService(deps.microvms, deps.sampler);
  // Endpoint tokens (X-aws-proxy-auth) and shell tokens, each under its own key derived from the master key.
  const accessTokens = new AccessTokens(deps.secrets.derive("endpoint-access-tokens"));
  const shellTokens = new AccessTokens(deps.secrets.derive("shell-access-tokens"));
  await registerMicroVmRoutes(app, { microvms: deps.microvms, guest, tokens: { access: accessTokens, shell: shellTokens }, db: deps.db, endpointUrl, execOutputBudget: new OutputBudget(deps.execOutputBudgetBytes ?? 256 * 2 ** 20), nodeChannel: deps.nodeChannel });
  registerConnectorRoutes(app, deps.microvms.connectors);
  await registerConsoleRoutes(app, domain); // the web console, /console/
  const apiKeyReaches = (apiKey: string, tenantId: string) => keyOfTenantGrants(deps.db, apiKey, tenantId, ENDPOINT_PERMISSION);
  await registerEndpointRoutes(app, new EndpointRouter(deps.microvms, guest, accessTokens, apiKeyReaches), domain);
  registerTerminalRoutes(app, { microvms: deps.microvms, guest, tickets, shellTokens });
  // The AWS Lambda MicroVMs API (docs/aws-api.md): the same core behind AWS's protocol.
  await registerAwsApi(app, { db: deps.db, secrets: deps.secrets, microvms: deps.microvms, images: deps.images, accessTokens, shellTokens, endpointUrl, nodeChannel: deps.nodeChannel });
  registerObserveRoutes(app, { guest, metrics: deps.metrics, metricsPublic: deps.metricsPublic ?? false });
  // MCP over streamable HTTP (packages/mcp, docs/mcp.md): its tools call this API on loopback with the caller's key.
  app.route({
    method: ["GET", "POST", "DELETE"],
    url: "/mcp",
    config: { permission: "microvm:read" },
    schema: { hide: true },
    handler: async (req, reply) => {
      reply.hijack();
      await handleMcpHttpRequest(req.raw, reply.raw, req.body, loopbackUrl(app.server.address()));
    },
  });
  return app;
}

/** Calls on a VM whose state lives in the database alone: any node answers them itself. */
const DATABASE_ONLY = /^\/v1\/microvms\/[^/?]+(\/(events|tags))?(\?|$)/;
/** The AWS door's operations that act on a VM's node (SuspendMicrovm, ResumeMicrovm, TerminateMicrovm). */
const AWS_ON_NODE = /^\/2025-09-09\/microvms\/[^/?]+(\/(suspend|resume))?(\?|$)/;

/**
 * Cluster routing: a request for a VM another live node runs (its /v1 calls
 * but those the database answers, its endpoint in either form, WebSockets
 * included) is forwarded there over the node channel once this node has
 * authenticated it; the answer streams back as is.
 */
function forwardToOwners(app: Api, channel: NodeChannel, microvms: MicroVmService, hostPattern: RegExp): void {
  app.addHook("onRequest", async (request, reply) => {
    if (request.forwarded) return;
    const params = request.params as { id?: unknown; microvmIdentifier?: unknown };
    const byPath = request.url.startsWith("/v1/microvms/") && typeof params.id === "string" ? params.id : undefined;
    // The AWS door: its SigV4 signature (Host included) is checked by the owner; the id may be an ARN.
    const identifier = request.method !== "GET" && AWS_ON_NODE.test(request.url) && typeof params.microvmIdentifier === "string" ? params.microvmIdentifier : undefined;
    const byAws = identifier === undefined ? undefined : (parseArn(identifier)?.id ?? identifier);
    const id = byPath ?? byAws ?? hostPattern.exec(request.headers.host ?? "")?.[2]?.toLowerCase();
    if (!id || (byPath && request.method === "GET" && DATABASE_ONLY.test(request.url))) return;
    const nodeUrl = await microvms.ownerUrl(id, request.tenantId || undefined);
    if (!nodeUrl) return;
    reply.hijack();
    if (request.ws) channel.forwardUpgrade(request.raw, request.raw.socket, nodeUrl, request.tenantId);
    else await channel.forwardHttp(request.raw, reply.raw, nodeUrl, request.tenantId);
    return reply;
  });
}

declare module "fastify" {
  interface FastifyRequest {
    /** Forwarded by a peer node over the node channel (cluster): served here, never forwarded again. */
    forwarded?: boolean;
    /** The tenant of the API key that authenticated the request. */
    tenantId: string;
  }
  interface FastifyContextConfig {
    /** Permission the route needs, e.g. "microvm:create"; absent: no authentication. */
    permission?: string;
    /** A WebSocket route that also takes a one-time `?ticket=` (TerminalTickets) instead of a key. */
    ticketed?: boolean;
    /** The route accepts WebSocket upgrades (a wsHandler); an upgrade to any other route is a 400. */
    upgrade?: boolean;
  }
}

export function errorBody(code: ErrorCode, message: string, details?: Record<string, unknown>) {
  return { error: { code, message, ...(details ? { details } : {}) } };
}

/** `url` with the values of credential parameters replaced, for logs. */
export function redactUrl(url: string): string {
  const q = url.indexOf("?");
  if (q < 0) return url;
  const params = url
    .slice(q + 1)
    .split("&")
    .map((pair) => {
      const eq = pair.indexOf("=");
      const name = eq < 0 ? pair : pair.slice(0, eq);
      let decoded = name;
      try {
        decoded = decodeURIComponent(name);
      } catch {
        // an undecodable name is no credential of ours
      }
      return SECRET_PARAMS.has(decoded) ? `${name}=[REDACTED]` : pair;
    });
  return `${url.slice(0, q)}?${params.join("&")}`;
}

/** Fastify's own errors for a client's mistake, by code: the status and message to answer with. */
const FRAMEWORK_ERRORS: Record<string, [ErrorCode, (err: FastifyError) => string]> = {
  FST_ERR_BAD_URL: ["ValidationError", () => "the URL path has an invalid percent-encoding"],
  FST_ERR_MAX_PARAM_LENGTH: ["ValidationError", () => "a path parameter exceeds 100 characters"],
  FST_ERR_CTP_INVALID_MEDIA_TYPE: ["UnsupportedMediaType", (err) => err.message],
  FST_ERR_CTP_BODY_TOO_LARGE: ["PayloadTooLarge", () => `the request body exceeds its limit of ${BODY_LIMIT_BYTES} bytes`],
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: ["ValidationError", () => "Content-Length does not match the body"],
  FST_ERR_CTP_INVALID_JSON_BODY: ["ValidationError", () => "the body is not valid JSON"],
};

/**
 * Maps any thrown error to a registered code: what is thrown below the API
 * (`toApiError`, shared with the AWS door), schema failures, Fastify's own
 * client errors. Anything else is a 500 whose details stay in the log.
 */
function toErrorResponse(err: FastifyError): { status: number; body: ReturnType<typeof errorBody> } {
  const answer = (code: ErrorCode, message: string, details?: Record<string, unknown>) => ({ status: ERROR_CODES[code].status, body: errorBody(code, message, details) });
  const thrown = toApiError(err);
  if (thrown) return answer(thrown.code, thrown.message, thrown.details);
  if (err.validation) {
    const first = err.validation[0];
    const field = `${err.validationContext ?? "body"}${first?.instancePath?.replace(/\//g, ".") ?? ""}`;
    return answer("ValidationError", `${field} ${first?.message ?? "is invalid"}`, { field });
  }
  const known = err.code ? FRAMEWORK_ERRORS[err.code] : undefined;
  if (known) return answer(known[0], known[1](err));
  // JSON.parse's SyntaxError (Fastify sets 400), proto poisoning, and any other client error Fastify raises.
  if (err.statusCode === 413) return answer("PayloadTooLarge", err.message);
  if (err.statusCode === 415) return answer("UnsupportedMediaType", err.message);
  if (err.statusCode && err.statusCode >= 400 && err.statusCode < 500) return answer("ValidationError", err.message);
  // A body so deeply nested that a parser ran out of stack is the client's doing.
  if (err instanceof RangeError && /call stack/i.test(err.message)) return answer("ValidationError", "the body is nested too deeply");
  return answer("Internal", "internal error; see the server log");
}
