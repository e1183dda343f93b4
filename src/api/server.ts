import swagger from "@fastify/swagger";
import websocket from "@fastify/websocket";
import type { TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import { Ajv } from "ajv";
import Fastify, { type FastifyError } from "fastify";
import { handleMcpHttpRequest, loopbackUrl } from "@cocoon/mcp";
import { ApiError, InvalidArgumentError, type ErrorCode } from "../errors.ts";
import type { MicroVmService } from "../lifecycle/microvms.ts";
import type { Db } from "../store/db.ts";
import type { ServerSecrets } from "../store/secrets.ts";
import type { ServerMetrics } from "../telemetry/metrics.ts";
import type { VmSampler } from "../telemetry/vm-samples.ts";
import type { Accelerator } from "../vmm/qemu.ts";
import { AccessTokens } from "../router/access-tokens.ts";
import { EndpointRouter, registerEndpointRoutes } from "../router/endpoint.ts";
import { registerAwsApi } from "./aws/index.ts";
import { authenticate } from "./auth.ts";
import type { ImageService } from "../images/service.ts";
import { registerConnectorRoutes } from "./routes/connectors.ts";
import { registerConsoleRoutes } from "./routes/console.ts";
import { registerImageRoutes } from "./routes/images.ts";
import { registerKeyRoutes } from "./routes/keys.ts";
import { registerMicroVmRoutes } from "./routes/microvms.ts";
import { registerObserveRoutes } from "./routes/observe.ts";
import { registerTerminalRoute } from "./routes/terminal.ts";

export const VERSION = "0.1.0";

export interface ApiDeps {
  db: Db;
  /** The server's master key (store/secrets.ts): seals API key secrets for SigV4, signs endpoint and shell tokens. */
  secrets: ServerSecrets;
  microvms: MicroVmService;
  accelerator: Accelerator;
  /** The QEMU jail's cgroup version; absent when QEMU runs unjailed (COCOON_JAIL=off, or not root). */
  jail?: { cgroupVersion: 1 | 2 };
  metrics: ServerMetrics;
  sampler: VmSampler;
  /** MicroVM Images (Dockerfile builds); without it only the built-in `base` exists. */
  images?: ImageService;
  /** Serve /metrics without an admin key (--metrics-public). */
  metricsPublic?: boolean;
  /** Endpoints are `http://{id}.{endpointDomain}:{port}/` (default vm.localhost). */
  endpointDomain?: string;
  logger?: boolean;
}

export type Api = ReturnType<typeof createFastify>;

function createFastify(logger: boolean) {
  return Fastify({
    logger: logger ? { level: "info" } : false,
    // 1 MiB for JSON; file uploads stream and are not bound by it.
    bodyLimit: 1024 * 1024,
    requestIdHeader: "x-request-id",
  }).withTypeProvider<TypeBoxTypeProvider>();
}

/** The HTTP API of API.md: routes only translate HTTP to lifecycle calls and back. */
export async function buildApi(deps: ApiDeps): Promise<Api> {
  const app = createFastify(deps.logger ?? false);
  await app.register(swagger, {
    openapi: {
      info: { title: "Cocoon API", version: VERSION },
      components: { securitySchemes: { apiKey: { type: "http", scheme: "bearer" } } },
      security: [{ apiKey: [] }],
    },
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
    void reply.status(404).send(errorBody("NotFound", `no route ${request.method} ${request.url.split("?")[0]}`));
  });
  // Uploads (PUT …/files) arrive as a stream of any content type.
  app.addContentTypeParser("*", (_request, payload, done) => done(null, payload));
  app.decorateRequest("tenantId", "");
  await app.register(websocket, { options: { maxPayload: 1024 * 1024 } });
  app.addHook("onRequest", async (request) => {
    const permission = (request.routeOptions.config as { permission?: string }).permission;
    if (!permission) return;
    // Browsers cannot set headers on a WebSocket: those upgrades may carry the key as ?access_token=.
    const token = request.headers.upgrade === "websocket" ? (request.query as { access_token?: string }).access_token : undefined;
    request.tenantId = await authenticate(deps.db, request.headers.authorization ?? (token ? `Bearer ${token}` : undefined), permission);
  });

  app.get("/v1/health", { schema: { security: [] } }, async () => ({
    status: "ok",
    accelerator: deps.accelerator,
    jail: deps.jail ? { enabled: true, cgroupVersion: deps.jail.cgroupVersion } : { enabled: false },
    version: VERSION,
  }));
  app.get("/v1/openapi.json", { schema: { hide: true } }, async () => app.swagger());
  registerKeyRoutes(app, deps.db, deps.secrets);
  if (deps.images) await registerImageRoutes(app, deps.images, deps.db, deps.microvms.connectors);
  const domain = deps.endpointDomain ?? "vm.localhost";
  const endpointUrl = (id: string) => {
    const address = app.server.address();
    return `http://${id}.${domain}:${typeof address === "object" && address ? address.port : 7070}/`;
  };
  // Endpoint tokens (X-aws-proxy-auth) and shell tokens, each under its own key derived from the master key.
  const accessTokens = new AccessTokens(deps.secrets.derive("endpoint-access-tokens"));
  const shellTokens = new AccessTokens(deps.secrets.derive("shell-access-tokens"));
  registerMicroVmRoutes(app, deps.microvms, endpointUrl, { access: accessTokens, shell: shellTokens }, deps.db);
  registerConnectorRoutes(app, deps.microvms.connectors);
  await registerConsoleRoutes(app, domain); // the web console, /console/
  await registerEndpointRoutes(app, new EndpointRouter(deps.db, deps.microvms, accessTokens), domain);
  registerTerminalRoute(app, deps.microvms, shellTokens);
  // The AWS Lambda MicroVMs API (docs/aws-api.md): the same core behind AWS's protocol.
  await registerAwsApi(app, { db: deps.db, secrets: deps.secrets, microvms: deps.microvms, images: deps.images, accessTokens, shellTokens, endpointUrl });
  registerObserveRoutes(app, { microvms: deps.microvms, sampler: deps.sampler, metrics: deps.metrics, metricsPublic: deps.metricsPublic ?? false });
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

declare module "fastify" {
  interface FastifyRequest {
    /** The tenant of the API key that authenticated the request. */
    tenantId: string;
  }
  interface FastifyContextConfig {
    /** Permission the route needs, e.g. "microvm:create"; absent: no authentication. */
    permission?: string;
  }
}

export function errorBody(code: ErrorCode, message: string, details?: Record<string, unknown>) {
  return { error: { code, message, ...(details ? { details } : {}) } };
}

/** Maps any thrown error to a registered code; only ApiError and client errors keep their message. */
function toErrorResponse(err: FastifyError): { status: number; body: ReturnType<typeof errorBody> } {
  if (err instanceof ApiError) return { status: err.status, body: errorBody(err.code, err.message, err.details) };
  if (err instanceof InvalidArgumentError) return { status: 400, body: errorBody("ValidationError", err.message, { field: err.field }) };
  if (err.validation) {
    const first = err.validation[0];
    const field = `${err.validationContext ?? "body"}${first?.instancePath?.replace(/\//g, ".") ?? ""}`;
    return { status: 400, body: errorBody("ValidationError", `${field} ${first?.message ?? "is invalid"}`, { field }) };
  }
  if (err.statusCode === 413) return { status: 413, body: errorBody("PayloadTooLarge", err.message) };
  if (err.statusCode && err.statusCode >= 400 && err.statusCode < 500) {
    return { status: 400, body: errorBody("ValidationError", err.message) };
  }
  return { status: 500, body: errorBody("Internal", "internal error; see the server log") };
}
