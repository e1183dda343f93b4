import { createHash, randomBytes } from "node:crypto";
import type { Db } from "./db.ts";
import type { ApiKey, Tenant } from "./schema.ts";
import type { ServerSecrets } from "./secrets.ts";

export const hashSecret = (secret: string) => createHash("sha256").update(secret).digest("hex");

export function createTenant(db: Db, name: string, settings: Partial<TenantSettings> = {}): Promise<Tenant> {
  const tenant = { id: `tnt-${randomBytes(6).toString("hex")}`, name, created_at: new Date().toISOString(), settings: JSON.stringify(settings) };
  return db.insertInto("tenants").values(tenant).returningAll().executeTakeFirstOrThrow();
}

export function findTenant(db: Db, idOrName: string): Promise<Tenant | undefined> {
  return db.selectFrom("tenants").selectAll().where((eb) => eb.or([eb("id", "=", idOrName), eb("name", "=", idOrName)])).executeTakeFirst();
}

export function listTenants(db: Db): Promise<Tenant[]> {
  return db.selectFrom("tenants").selectAll().orderBy("created_at").orderBy("id").execute();
}

/** What an admin sets per tenant (PATCH /v1/tenants/{name}); stored as JSON in `tenants.settings`. */
export interface TenantSettings {
  /** S3 locations ("bucket/prefix") the tenant's code URIs may read; empty: no s3:// at all. */
  s3Allow: string[];
}

/** The tenant's settings; anything missing or unreadable in the stored JSON is the default (nothing allowed). */
export function tenantSettings(tenant: Tenant): TenantSettings {
  let stored: Partial<TenantSettings> = {};
  try {
    stored = JSON.parse(tenant.settings) as Partial<TenantSettings>;
  } catch {
    // not JSON: the defaults
  }
  const s3Allow = Array.isArray(stored.s3Allow) ? stored.s3Allow.filter((e): e is string => typeof e === "string") : [];
  return { s3Allow };
}

/** Settings of the tenant with this id (the defaults for an unknown one). */
export async function settingsOf(db: Db, tenantId: string): Promise<TenantSettings> {
  const tenant = await db.selectFrom("tenants").selectAll().where("id", "=", tenantId).executeTakeFirst();
  return tenant ? tenantSettings(tenant) : { s3Allow: [] };
}

/** Replaces the given settings of a tenant, keeping the others; returns the updated row. */
export function updateTenantSettings(db: Db, tenantId: string, patch: Partial<TenantSettings>): Promise<Tenant> {
  return db.transaction().execute(async (tx) => {
    const tenant = await tx.selectFrom("tenants").selectAll().where("id", "=", tenantId).executeTakeFirstOrThrow();
    const settings = JSON.stringify({ ...tenantSettings(tenant), ...patch });
    return tx.updateTable("tenants").set({ settings }).where("id", "=", tenantId).returningAll().executeTakeFirstOrThrow();
  });
}

/**
 * Creates a key and returns its secret (`ck_…`), which is never stored in the
 * clear: its hash finds it for Bearer authentication, and a copy sealed with
 * the server's master key lets SigV4 signatures be checked (SECURITY.md).
 */
export async function createApiKey(
  db: Db,
  secrets: ServerSecrets,
  opts: { tenantId: string; permissions: string[]; description?: string },
): Promise<{ key: ApiKey; apiKey: string }> {
  const apiKey = `ck_${randomBytes(24).toString("base64url")}`;
  const id = `key-${randomBytes(6).toString("hex")}`;
  const key = await db
    .insertInto("api_keys")
    .values({
      id,
      tenant_id: opts.tenantId,
      secret_hash: hashSecret(apiKey),
      secret_sealed: secrets.seal(apiKey, id),
      permissions: JSON.stringify(opts.permissions),
      description: opts.description ?? null,
      created_at: new Date().toISOString(),
      revoked_at: null,
    })
    .returningAll()
    .executeTakeFirstOrThrow();
  return { key, apiKey };
}

/** The live (not revoked) key whose secret is `apiKey`. Looked up per request: revocation is immediate. */
export function findLiveKey(db: Db, apiKey: string): Promise<ApiKey | undefined> {
  return db.selectFrom("api_keys").selectAll().where("secret_hash", "=", hashSecret(apiKey)).where("revoked_at", "is", null).executeTakeFirst();
}

/** The live (not revoked) key with this id (SigV4's access key id). */
export function findLiveKeyById(db: Db, keyId: string): Promise<ApiKey | undefined> {
  return db.selectFrom("api_keys").selectAll().where("id", "=", keyId).where("revoked_at", "is", null).executeTakeFirst();
}

export function listKeys(db: Db): Promise<ApiKey[]> {
  return db.selectFrom("api_keys").selectAll().orderBy("created_at").execute();
}

/** Returns false if there is no such live key. */
export async function revokeKey(db: Db, keyId: string): Promise<boolean> {
  const res = await db.updateTable("api_keys").set({ revoked_at: new Date().toISOString() }).where("id", "=", keyId).where("revoked_at", "is", null).executeTakeFirst();
  return res.numUpdatedRows > 0n;
}

export async function hasAdminKey(db: Db): Promise<boolean> {
  const row = await db.selectFrom("api_keys").select("id").where("permissions", "like", '%"admin:*"%').where("revoked_at", "is", null).executeTakeFirst();
  return row !== undefined;
}
