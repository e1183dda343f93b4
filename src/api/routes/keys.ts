import { Type } from "@fastify/type-provider-typebox";
import { ApiError } from "../../errors.ts";
import { checkS3Allow } from "../../images/intake.ts";
import type { Db } from "../../store/db.ts";
import type { Tenant } from "../../store/schema.ts";
import type { ServerSecrets } from "../../store/secrets.ts";
import { createApiKey, createTenant, findTenant, listKeys, listTenants, QUOTA_LIMITS, revokeKey, tenantSettings, updateTenantSettings } from "../../store/tenants.ts";
import { ref } from "../schemas.ts";
import type { Api } from "../fastify.ts";

const PERMISSION = Type.String({
  pattern: "^(admin:\\*|image:(\\*|create|read|delete)|volume:(\\*|create|read|delete)|microvm:(\\*|create|read|exec|endpoint|suspend|resume|terminate))$",
  description: "e.g. microvm:*, image:read, volume:*, admin:*; microvm:endpoint reaches the tenant's VM endpoints with the key",
});

const S3_ALLOW = Type.Array(Type.String({ minLength: 1, maxLength: 1100 }), {
  maxItems: 100,
  description: 'S3 locations the tenant\'s code URIs may read, "bucket/" or "bucket/prefix" (a plain prefix of bucket/key); empty: no s3:// at all',
});
const TenantParams = Type.Object({ tenant: Type.String({ minLength: 1, maxLength: 64, description: "tenant id or name" }) });

const quota = (what: string) => Type.Optional(Type.Integer({ minimum: QUOTA_LIMITS.min, maximum: QUOTA_LIMITS.max, description: what }));
const QUOTAS = Type.Object(
  {
    images: quota("image versions the tenant may hold"),
    suspendedMicroVms: quota("microVMs the tenant may keep suspended"),
    baseShapes: quota("new shapes (vCPUs, memory) of managed images the tenant may cause to be snapshotted"),
    volumes: quota("persistent volumes the tenant may hold"),
    volumeGiB: quota("the total size in GiB of the tenant's volumes"),
  },
  { additionalProperties: false, description: "overrides of the operator's defaults (COCOON_QUOTA_*)" },
);

const tenantView = (t: Tenant) => ({ tenantId: t.id, name: t.name, createdAt: t.created_at, ...tenantSettings(t) });

/** Tenants, their settings and API keys (admin only). */
export function registerKeyRoutes(app: Api, db: Db, secrets: ServerSecrets): void {
  const admin = { permission: "admin:*" };
  const tenantOr404 = async (idOrName: string) => {
    const tenant = await findTenant(db, idOrName);
    if (!tenant) throw new ApiError("NotFound", `tenant ${idOrName} not found`, { field: "tenant" });
    return tenant;
  };

  app.post(
    "/v1/tenants",
    {
      config: admin,
      schema: {
        body: Type.Object(
          { name: Type.String({ minLength: 1, maxLength: 64, pattern: "^[A-Za-z0-9][A-Za-z0-9._-]*$" }), s3Allow: Type.Optional(S3_ALLOW), quotas: Type.Optional(QUOTAS) },
          { additionalProperties: false },
        ),
        response: { 201: ref("Tenant") },
      },
    },
    async (req, reply) => {
      const s3Allow = checkS3Allow(req.body.s3Allow ?? []);
      if (await findTenant(db, req.body.name)) throw new ApiError("Conflict", `tenant ${req.body.name} already exists`, { field: "name" });
      return reply.status(201).send(tenantView(await createTenant(db, req.body.name, { s3Allow, quotas: req.body.quotas })));
    },
  );

  app.get("/v1/tenants", { config: admin, schema: { response: { 200: Type.Object({ tenants: Type.Array(ref("Tenant")) }) } } }, async () => ({ tenants: (await listTenants(db)).map(tenantView) }));

  app.get("/v1/tenants/:tenant", { config: admin, schema: { params: TenantParams, response: { 200: ref("Tenant") } } }, async (req) => tenantView(await tenantOr404(req.params.tenant)));

  app.patch(
    "/v1/tenants/:tenant",
    { config: admin, schema: { params: TenantParams, body: Type.Object({ s3Allow: Type.Optional(S3_ALLOW), quotas: Type.Optional(QUOTAS) }, { additionalProperties: false }),
        response: { 200: ref("Tenant") },
      },
    },
    async (req) => {
      const s3Allow = req.body.s3Allow && checkS3Allow(req.body.s3Allow);
      const tenant = await tenantOr404(req.params.tenant);
      return tenantView(await updateTenantSettings(db, tenant.id, { ...(s3Allow ? { s3Allow } : {}), ...(req.body.quotas ? { quotas: req.body.quotas } : {}) }));
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
        response: { 201: ref("CreatedApiKey") },
      },
    },
    async (req, reply) => {
      const tenant = await findTenant(db, req.body.tenant);
      if (!tenant) throw new ApiError("NotFound", `tenant ${req.body.tenant} not found`, { field: "tenant" });
      const { key, apiKey } = await createApiKey(db, secrets, { tenantId: tenant.id, permissions: req.body.permissions, description: req.body.description });
      return reply.status(201).send({ keyId: key.id, apiKey, tenantId: tenant.id, permissions: req.body.permissions, createdAt: key.created_at });
    },
  );

  app.get("/v1/keys", { config: admin, schema: { response: { 200: Type.Object({ keys: Type.Array(ref("ApiKey")) }) } } }, async () => ({
    keys: (await listKeys(db)).map((k) => ({
      keyId: k.id,
      tenantId: k.tenant_id,
      permissions: JSON.parse(k.permissions) as string[],
      description: k.description ?? undefined,
      createdAt: k.created_at,
      revokedAt: k.revoked_at ?? undefined,
    })),
  }));

  app.delete("/v1/keys/:keyId", { config: admin, schema: { params: Type.Object({ keyId: Type.String({ maxLength: 64 }) }), response: { 200: Type.Object({ keyId: Type.String(), revoked: Type.Literal(true) }) } } }, async (req) => {
    if (!(await revokeKey(db, req.params.keyId))) throw new ApiError("NotFound", `key ${req.params.keyId} not found`);
    return { keyId: req.params.keyId, revoked: true as const };
  });
}
