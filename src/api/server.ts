import swagger from "@fastify/swagger";
import websocket from "@fastify/websocket";
import { Ajv } from "ajv";
import { handleMcpHttpRequest, loopbackUrl } from "@cocoon/mcp";
import type { FastifyError } from "fastify";
import { AsyncLocalStorage } from "node:async_hooks";
import type { Writable } from "node:stream";
import { ApiError } from "../errors.ts";
import { createFastify, errorBody, toErrorResponse, type Api, type ApiTimeouts } from "./fastify.ts";
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
import { registerVolumeRoutes } from "./routes/volumes.ts";
import { TerminalTickets } from "./tickets.ts";

export const VERSION = "0.1.0";


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



/** The request whose handling is running, for a last-resort handler's log line (src/server/main.ts). */
const requestContext = new AsyncLocalStorage<{ requestId: string }>();
export const currentRequestId = (): string | undefined => requestContext.getStore()?.requestId;


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
  registerVolumeRoutes(app, deps.microvms.volumes);
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


