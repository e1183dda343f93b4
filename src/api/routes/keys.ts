import { Type } from "@fastify/type-provider-typebox";
import { ApiError } from "../../errors.ts";
import type { Db } from "../../store/db.ts";
import { createApiKey, createTenant, findTenant, listKeys, revokeKey } from "../../store/tenants.ts";
import type { Api } from "../server.ts";

const PERMISSION = Type.String({
  pattern: "^(admin:\\*|image:(\\*|create|read|delete)|microvm:(\\*|create|read|exec|endpoint|suspend|resume|terminate))$",
  description: "e.g. microvm:*, image:read, admin:*; microvm:endpoint reaches the tenant's VM endpoints with the key",
});

/** Tenants and API keys (admin only). */
export function registerKeyRoutes(app: Api, db: Db): void {
  const admin = { permission: "admin:*" };

  app.post(
    "/v1/tenants",
    { config: admin, schema: { body: Type.Object({ name: Type.String({ minLength: 1, maxLength: 64, pattern: "^[A-Za-z0-9][A-Za-z0-9._-]*$" }) }, { additionalProperties: false }) } },
    async (req, reply) => {
      if (await findTenant(db, req.body.name)) throw new ApiError("Conflict", `tenant ${req.body.name} already exists`, { field: "name" });
      const t = await createTenant(db, req.body.name);
      return reply.status(201).send({ tenantId: t.id, name: t.name, createdAt: t.created_at });
    },
  );

  app.post(
    "/v1/keys",
    {
      config: admin,
      schema: {
        body: Type.Object(
          {
            tenant: Type.String({ minLength: 1, maxLength: 64, description: "tenant id or name" }),
            permissions: Type.Array(PERMISSION, { minItems: 1, maxItems: 32 }),
            description: Type.Optional(Type.String({ maxLength: 256 })),
          },
          { additionalProperties: false },
        ),
      },
    },
    async (req, reply) => {
      const tenant = await findTenant(db, req.body.tenant);
      if (!tenant) throw new ApiError("NotFound", `tenant ${req.body.tenant} not found`, { field: "tenant" });
      const { key, apiKey } = await createApiKey(db, { tenantId: tenant.id, permissions: req.body.permissions, description: req.body.description });
      return reply.status(201).send({ keyId: key.id, apiKey, tenantId: tenant.id, permissions: req.body.permissions, createdAt: key.created_at });
    },
  );

  app.get("/v1/keys", { config: admin }, async () => ({
    keys: (await listKeys(db)).map((k) => ({
      keyId: k.id,
      tenantId: k.tenant_id,
      permissions: JSON.parse(k.permissions) as string[],
      description: k.description ?? undefined,
      createdAt: k.created_at,
      revokedAt: k.revoked_at ?? undefined,
    })),
  }));

  app.delete("/v1/keys/:keyId", { config: admin, schema: { params: Type.Object({ keyId: Type.String({ maxLength: 64 }) }) } }, async (req) => {
    if (!(await revokeKey(db, req.params.keyId))) throw new ApiError("NotFound", `key ${req.params.keyId} not found`);
    return { keyId: req.params.keyId, revoked: true };
  });
}
