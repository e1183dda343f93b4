import type { TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import type { FastifyBaseLogger, FastifyError, FastifyInstance, RawReplyDefaultExpression, RawRequestDefaultExpression, RawServerDefault } from "fastify";
import { ApiError } from "../../errors.ts";
import type { ImageService } from "../../images/service.ts";
import type { MicroVmService } from "../../lifecycle/microvms.ts";
import type { AccessTokens } from "../../router/access-tokens.ts";
import type { NodeChannel } from "../../router/node-channel.ts";
import type { Db } from "../../store/db.ts";
import type { ServerSecrets } from "../../store/secrets.ts";
import { grants } from "../auth.ts";
import { BODY_LIMIT_BYTES, type Api } from "../fastify.ts";
import { AwsError, toAwsError } from "./errors.ts";
import { registerImageOperations } from "./images.ts";
import { registerMicroVmOperations } from "./microvms.ts";
import { verifySigV4, type AwsCaller } from "./sigv4.ts";
import { registerTagOperations } from "./tags.ts";

export interface AwsApiDeps {
  db: Db;
  secrets: ServerSecrets;
  microvms: MicroVmService;
  /** Without it (no image builds), the image operations answer for managed images only. */
  images?: ImageService;
  accessTokens: AccessTokens;
  shellTokens: AccessTokens;
  /** The VM's endpoint URL (`http://{id}.{domain}:{port}/`). */
  endpointUrl: (id: string) => string;
  /** Cluster: RunMicrovm this node has no room for is offered to its peers over it. */
  nodeChannel?: NodeChannel;
}

/** A Fastify scope of the AWS door, with the typed schemas of TypeBox. */
export type AwsScope = FastifyInstance<RawServerDefault, RawRequestDefaultExpression, RawReplyDefaultExpression, FastifyBaseLogger, TypeBoxTypeProvider>;


/**
 * The AWS Lambda MicroVMs API (`lambda-microvms-2025-09-09`, REST-JSON,
 * SigV4) beside `/v1` on the same port: a second front door onto the same
 * lifecycle, images, tenants and keys. Routes only translate: every
 * behaviour lives in the core, and errors are mapped at this edge
 * (errors.ts). Tags live under `/2017-03-31/tags/…`, where the client puts them.
 */
export async function registerAwsApi(app: Api, deps: AwsApiDeps): Promise<void> {
  for (const prefix of ["/2025-09-09", "/2017-03-31"]) {
    await app.register(
      async (plugin) => {
        const scope = plugin.withTypeProvider<TypeBoxTypeProvider>();
        // /v1/openapi.json documents /v1; this door's contract is the AWS model (docs/aws-api.md).
        scope.addHook("onRoute", (route) => {
          route.schema = { ...route.schema, hide: true };
        });
        // The signature covers the exact bytes: bodies arrive raw and are parsed after it is checked.
        scope.removeAllContentTypeParsers();
        scope.addContentTypeParser("*", { parseAs: "buffer", bodyLimit: BODY_LIMIT_BYTES }, (_req, body, done) => done(null, body));
        scope.decorateRequest("aws", null as unknown as AwsCaller);
        scope.addHook("preValidation", async (req) => {
          const raw = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
          req.aws = await verifySigV4(deps.db, deps.secrets, { method: req.method, url: req.raw.url ?? req.url, headers: req.headers, body: raw });
          const permission = (req.routeOptions.config as { awsPermission?: string }).awsPermission;
          if (permission) requirePermission(req.aws, permission);
          if (raw.length) {
            try {
              req.body = JSON.parse(raw.toString("utf8"));
            } catch {
              throw new ApiError("ValidationError", "the request body is not valid JSON");
            }
          } else req.body = req.routeOptions.schema?.body ? {} : undefined;
        });
        scope.addHook("onSend", async (req, reply) => {
          void reply.header("x-amzn-requestid", req.id);
        });
        scope.setErrorHandler((err: FastifyError, req, reply) => {
          const res = toAwsError(err);
          if (res.status >= 500 && res.type === "InternalServerException") req.log.error({ err }, "request failed");
          if (res.retryAfterSeconds) void reply.header("retry-after", String(res.retryAfterSeconds));
          void reply.status(res.status).header("x-amzn-errortype", res.type).send(res.body);
        });
        scope.setNotFoundHandler(async (req) => {
          throw new AwsError("UnknownOperationException", 404, `no operation ${req.method} ${req.url.split("?")[0]}`);
        });
        if (prefix === "/2017-03-31") registerTagOperations(scope, deps);
        else {
          registerMicroVmOperations(scope, deps);
          registerImageOperations(scope, deps);
        }
      },
      { prefix },
    );
  }
}

/** The key's permissions apply exactly as on `/v1` (api/auth.ts `grants`). */
export function requirePermission(caller: AwsCaller, permission: string): void {
  if (!grants(caller.permissions, permission)) throw new ApiError("Forbidden", `this key lacks the ${permission} permission`, { permission });
}

declare module "fastify" {
  interface FastifyRequest {
    /** The SigV4 signer of a request to the AWS door. */
    aws: AwsCaller;
  }
  interface FastifyContextConfig {
    /** Permission an AWS operation needs, checked once its signature is. */
    awsPermission?: string;
  }
}
