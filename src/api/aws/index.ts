import type { TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import type { FastifyError } from "fastify";
import { ApiError } from "../../errors.ts";
import { BODY_LIMIT_BYTES, type Api } from "../fastify.ts";
import { AwsError, toAwsError } from "./errors.ts";
import { registerImageOperations } from "./images.ts";
import { registerMicroVmOperations } from "./microvms.ts";
import { requirePermission, type AwsApiDeps } from "./scope.ts";
import { verifySigV4, type AwsCaller } from "./sigv4.ts";
import { registerTagOperations } from "./tags.ts";

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

