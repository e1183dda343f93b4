import { createHash, randomBytes } from "node:crypto";
import { ApiError } from "../errors.ts";
import type { Db } from "./db.ts";
import type { ApiKey, Tenant } from "./schema.ts";
import type { ServerSecrets } from "./secrets.ts";

export const hashSecret = (secret: string) => createHash("sha256").update(secret).digest("hex");

export function createTenant(db: Db, name: string, settings: StoredSettings = {}): Promise<Tenant> {
  const tenant = { id: `tnt-${randomBytes(6).toString("hex")}`, name, created_at: new Date().toISOString(), settings: JSON.stringify(settings) };
  return db.insertInto("tenants").values(tenant).returningAll().executeTakeFirstOrThrow();
}

export function findTenant(db: Db, idOrName: string): Promise<Tenant | undefined> {
  return db.selectFrom("tenants").selectAll().where((eb) => eb.or([eb("id", "=", idOrName), eb("name", "=", idOrName)])).executeTakeFirst();
}

export function listTenants(db: Db): Promise<Tenant[]> {
  return db.selectFrom("tenants").selectAll().orderBy("created_at").orderBy("id").execute();
}

/**
 * What a tenant may hold of what outlives admission: image versions (their
 * disks and memory files stay on the host), suspended microVMs (their saved
 * memory), and base shapes, memory sizes and vCPU counts of a managed image
 * it was the first to ask for (each one cold-boots and keeps a snapshot),
 * persistent volumes and their total size (each a file on the host's disk).
 */
export interface TenantQuotas {
  images: number;
  suspendedMicroVms: number;
  baseShapes: number;
  volumes: number;
  volumeGiB: number;
}

export const QUOTA_LIMITS = { min: 0, max: 100_000 } as const;

/**
 * The operator's defaults, COCOON_QUOTA_IMAGES (100), COCOON_QUOTA_SUSPENDED
 * (200), COCOON_QUOTA_BASE_SHAPES (4), COCOON_QUOTA_VOLUMES (20) and
 * COCOON_QUOTA_VOLUME_GIB (100); a bad value is an error naming the
 * variable. An admin overrides them per tenant (`quotas` in the settings).
 */
export function defaultQuotas(env: NodeJS.ProcessEnv = process.env): TenantQuotas {
  const read = (name: string, fallback: number) => {
    const raw = env[name];
    if (raw === undefined || raw === "") return fallback;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < QUOTA_LIMITS.min || n > QUOTA_LIMITS.max) throw new Error(`${name} must be an integer between ${QUOTA_LIMITS.min} and ${QUOTA_LIMITS.max}, got "${raw}"`);
    return n;
  };
  return {
    images: read("COCOON_QUOTA_IMAGES", 100),
    suspendedMicroVms: read("COCOON_QUOTA_SUSPENDED", 200),
    baseShapes: read("COCOON_QUOTA_BASE_SHAPES", 4),
    volumes: read("COCOON_QUOTA_VOLUMES", 20),
    volumeGiB: read("COCOON_QUOTA_VOLUME_GIB", 100),
  };
}

/** What an admin sets per tenant (PATCH /v1/tenants/{name}); stored as JSON in `tenants.settings`. */
export interface TenantSettings {
  /** S3 locations ("bucket/prefix") the tenant's code URIs may read; empty: no s3:// at all. */
  s3Allow: string[];
  /** The tenant's quotas: its overrides over the operator's defaults. */
  quotas: TenantQuotas;
}

/** The settings an admin stored for a tenant (overrides only): what `updateTenantSettings` merges into. */
type StoredSettings = { s3Allow?: string[]; quotas?: Partial<TenantQuotas> };

function storedSettings(tenant: Tenant): StoredSettings {
  try {
    return JSON.parse(tenant.settings) as StoredSettings;
  } catch {
    return {}; // not JSON: the defaults
  }
}

/** The tenant's settings; anything missing or unreadable in the stored JSON is the default (nothing allowed, the operator's quotas). */
export function tenantSettings(tenant: Tenant | undefined): TenantSettings {
  const stored = tenant ? storedSettings(tenant) : {};
  const s3Allow = Array.isArray(stored.s3Allow) ? stored.s3Allow.filter((e): e is string => typeof e === "string") : [];
  const quotas = defaultQuotas();
  for (const key of Object.keys(quotas) as (keyof TenantQuotas)[]) {
    const own = stored.quotas?.[key];
    if (typeof own === "number" && Number.isInteger(own) && own >= QUOTA_LIMITS.min) quotas[key] = own;
  }
  return { s3Allow, quotas };
}

/** Settings of the tenant with this id (the defaults for an unknown one). */
export async function settingsOf(db: Db, tenantId: string): Promise<TenantSettings> {
  return tenantSettings(await db.selectFrom("tenants").selectAll().where("id", "=", tenantId).executeTakeFirst());
}

/**
 * Refuses (429 QuotaExceeded, naming the quota and the limit) when the tenant
 * already holds `held` of what `quota` counts and wants `adding` more.
 */
export async function checkQuota(db: Db, tenantId: string, quota: keyof TenantQuotas, held: number, what: string, adding = 1): Promise<void> {
  const limit = (await settingsOf(db, tenantId)).quotas[quota];
  if (held + adding > limit) {
    throw new ApiError("QuotaExceeded", `the tenant holds ${held} ${what}, its quota (${quota}) is ${limit}: free some, or ask an admin to raise it`, { quota, limit, held });
  }
}

/** Replaces the given settings of a tenant (quotas one by one), keeping the others; returns the updated row. */
export function updateTenantSettings(db: Db, tenantId: string, patch: StoredSettings): Promise<Tenant> {
  return db.transaction().execute(async (tx) => {
    const tenant = await tx.selectFrom("tenants").selectAll().where("id", "=", tenantId).executeTakeFirstOrThrow();
    const stored = storedSettings(tenant);
    const settings = JSON.stringify({ ...stored, ...patch, quotas: { ...stored.quotas, ...patch.quotas } });
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
