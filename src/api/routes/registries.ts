import { Type } from "@fastify/type-provider-typebox";
import type { RegistryCredentials } from "../../images/registry/credentials.ts";
import { ref } from "../schemas.ts";
import type { Api } from "../fastify.ts";

const HostParams = Type.Object({ host: Type.String({ minLength: 1, maxLength: 255, description: "registry host[:port], e.g. ghcr.io, docker.io, registry.example.com:5000" }) });

/**
 * A tenant's registry credentials, used when a Dockerfile's FROM (or COPY
 * --from) names an image of that registry. Stored sealed; never returned.
 * Writing them takes image:create, listing image:read.
 */
export function registerRegistryRoutes(app: Api, registries: RegistryCredentials): void {
  app.put(
    "/v1/registries/:host",
    {
      config: { permission: "image:create" },
      schema: {
        description: "Store (or replace) the tenant's credentials for a registry: `{username, password}` (a token for GHCR and most registries). The password is never returned.",
        params: HostParams,
        body: Type.Object({ username: Type.String({ minLength: 1, maxLength: 256 }), password: Type.String({ minLength: 1, maxLength: 8192 }) }, { additionalProperties: false }),
        response: { 200: ref("RegistryCredentials") },
      },
    },
    async (req) => registries.put(req.tenantId, req.params.host, req.body.username, req.body.password),
  );

  app.get("/v1/registries", { config: { permission: "image:read" }, schema: { response: { 200: Type.Object({ registries: Type.Array(ref("RegistryCredentials")) }) } } }, async (req) => ({ registries: await registries.list(req.tenantId) }));

  app.get("/v1/registries/:host", { config: { permission: "image:read" }, schema: { params: HostParams, response: { 200: ref("RegistryCredentials") } } }, async (req) => registries.get(req.tenantId, req.params.host));

  app.delete("/v1/registries/:host", { config: { permission: "image:create" }, schema: { params: HostParams, response: { 200: Type.Object({ host: Type.String(), deleted: Type.Literal(true) }) } } }, async (req) => {
    await registries.delete(req.tenantId, req.params.host);
    return { host: req.params.host, deleted: true as const };
  });
}
