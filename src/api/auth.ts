import { ApiError } from "../errors.ts";
import type { Db } from "../store/db.ts";
import { findLiveKey } from "../store/tenants.ts";

/**
 * True if a key's permissions grant `needed`: exact match, `<resource>:*`, or
 * `admin:*` (which grants everything within the key's own tenant).
 */
export function grants(permissions: string[], needed: string): boolean {
  const resource = needed.split(":")[0];
  return permissions.some((p) => p === needed || p === "admin:*" || p === `${resource}:*`);
}

/** Resolves `Authorization: Bearer <apiKey>` to its tenant, or throws 401/403. The key is looked up on every request, so a revocation takes effect at once. */
export async function authenticate(db: Db, authorization: string | undefined, permission: string): Promise<string> {
  const apiKey = /^Bearer\s+(\S+)$/i.exec(authorization ?? "")?.[1];
  if (!apiKey) throw new ApiError("Unauthorized", "missing API key: send Authorization: Bearer <apiKey>");
  const key = await findLiveKey(db, apiKey);
  if (!key) throw new ApiError("Unauthorized", "unknown or revoked API key");
  if (!grants(JSON.parse(key.permissions) as string[], permission)) {
    throw new ApiError("Forbidden", `this key lacks the ${permission} permission`, { permission });
  }
  return key.tenant_id;
}

/** Whether `apiKey` is a live key of `tenantId` holding `permission` (no error: for credentials tried in turn). */
export async function keyOfTenantGrants(db: Db, apiKey: string, tenantId: string, permission: string): Promise<boolean> {
  const key = await findLiveKey(db, apiKey);
  return key?.tenant_id === tenantId && grants(JSON.parse(key.permissions) as string[], permission);
}
