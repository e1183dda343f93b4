import { ApiError } from "../errors.ts";
import type { Db } from "./db.ts";

/** What can be tagged: a microVM (by id) or an image (by name, all its versions). */
export type TaggedResource = { type: "microvm" | "microvm-image"; id: string };

/** AWS's tag limits, kept for both APIs. */
export const TAG_LIMITS = { perResource: 50, keyLength: 128, valueLength: 256 } as const;

export async function listTags(db: Db, tenantId: string, resource: TaggedResource): Promise<Record<string, string>> {
  const rows = await db
    .selectFrom("tags")
    .select(["key", "value"])
    .where("tenant_id", "=", tenantId)
    .where("resource_type", "=", resource.type)
    .where("resource_id", "=", resource.id)
    .orderBy("key")
    .execute();
  return Object.fromEntries(rows.map((r) => [r.key, r.value]));
}

/**
 * Adds or replaces tags. Keys are 1–128 characters and may not start with
 * `aws:` (reserved, as on AWS); values up to 256. More than 50 tags on one
 * resource is QuotaExceeded. The caller has checked that the resource exists.
 */
export async function tagResource(db: Db, tenantId: string, resource: TaggedResource, tags: Record<string, string>): Promise<void> {
  for (const [key, value] of Object.entries(tags)) {
    if (key.length < 1 || key.length > TAG_LIMITS.keyLength) throw new ApiError("ValidationError", `tag keys must be 1 to ${TAG_LIMITS.keyLength} characters, got "${key.slice(0, 140)}"`, { field: "tags" });
    if (key.toLowerCase().startsWith("aws:")) throw new ApiError("ValidationError", `tag key ${key}: the aws: prefix is reserved`, { field: "tags" });
    if (typeof value !== "string" || value.length > TAG_LIMITS.valueLength) throw new ApiError("ValidationError", `tag ${key}: values are strings of at most ${TAG_LIMITS.valueLength} characters`, { field: "tags" });
  }
  await db.transaction().execute(async (tx) => {
    const existing = await tx
      .selectFrom("tags")
      .select("key")
      .where("tenant_id", "=", tenantId)
      .where("resource_type", "=", resource.type)
      .where("resource_id", "=", resource.id)
      .execute();
    const keys = new Set([...existing.map((r) => r.key), ...Object.keys(tags)]);
    if (keys.size > TAG_LIMITS.perResource) {
      throw new ApiError("QuotaExceeded", `a resource has at most ${TAG_LIMITS.perResource} tags; this would make ${keys.size}`, { quota: "tags per resource", limit: TAG_LIMITS.perResource });
    }
    for (const [key, value] of Object.entries(tags)) {
      await tx
        .insertInto("tags")
        .values({ tenant_id: tenantId, resource_type: resource.type, resource_id: resource.id, key, value })
        .onConflict((oc) => oc.columns(["tenant_id", "resource_type", "resource_id", "key"]).doUpdateSet({ value }))
        .execute();
    }
  });
}

/** Removes the given keys; keys the resource does not have are ignored. */
export async function untagResource(db: Db, tenantId: string, resource: TaggedResource, keys: string[]): Promise<void> {
  if (!keys.length) return;
  await db
    .deleteFrom("tags")
    .where("tenant_id", "=", tenantId)
    .where("resource_type", "=", resource.type)
    .where("resource_id", "=", resource.id)
    .where("key", "in", keys)
    .execute();
}

/** Removes every tag of a resource (when it is deleted). */
export async function deleteTags(db: Db, tenantId: string, resource: TaggedResource): Promise<void> {
  await db.deleteFrom("tags").where("tenant_id", "=", tenantId).where("resource_type", "=", resource.type).where("resource_id", "=", resource.id).execute();
}
