import { createHash } from "node:crypto";
import { ApiError } from "../errors.ts";
import type { Db } from "./db.ts";
import { serialized } from "./locks.ts";

/** A client token: 1–64 printable ASCII characters (as AWS's clientToken). */
const TOKEN = /^[\x21-\x7e]{1,64}$/;
/** How long a token is remembered; a retry later than that creates a new resource. */
const TOKEN_TTL_MS = 24 * 3600 * 1000;

export interface IdempotencyKey {
  tenantId: string;
  /** The operation the token belongs to, e.g. "create-microvm". */
  operation: string;
  token: string;
}

/**
 * Client-token idempotency (AWS `clientToken`, also `/v1`): the first call
 * with a token creates the resource and remembers its id; a retry with the
 * same token and the same request gets that id back instead of a second
 * resource; the same token with a different request is a Conflict (409).
 * A call that fails remembers nothing, so it can be retried. Calls with one
 * token are serialized (across every server sharing the database), so two
 * concurrent retries never both create.
 */
export class IdempotencyTokens {
  constructor(private readonly db: Db) {}

  async run(key: IdempotencyKey, request: unknown, create: () => Promise<string>): Promise<{ resourceId: string; replayed: boolean }> {
    if (!TOKEN.test(key.token)) throw new ApiError("ValidationError", "clientToken must be 1 to 64 printable ASCII characters", { field: "clientToken" });
    const digest = createHash("sha256").update(canonicalJson(request)).digest("hex");
    return serialized(this.db, `idempotency:${key.tenantId}\n${key.operation}\n${key.token}`, async () => {
      const since = new Date(Date.now() - TOKEN_TTL_MS).toISOString();
      await this.db.deleteFrom("idempotency_tokens").where("created_at", "<", since).execute();
      const seen = await this.db
        .selectFrom("idempotency_tokens")
        .selectAll()
        .where("tenant_id", "=", key.tenantId)
        .where("operation", "=", key.operation)
        .where("token", "=", key.token)
        .executeTakeFirst();
      if (seen) {
        if (seen.request_digest !== digest) {
          throw new ApiError("Conflict", `clientToken ${key.token} was already used with a different request (for ${seen.resource_id})`, {
            field: "clientToken",
            resourceId: seen.resource_id,
          });
        }
        return { resourceId: seen.resource_id, replayed: true };
      }
      const resourceId = await create();
      await this.db
        .insertInto("idempotency_tokens")
        .values({ tenant_id: key.tenantId, operation: key.operation, token: key.token, request_digest: digest, resource_id: resourceId, created_at: new Date().toISOString() })
        .execute();
      return { resourceId, replayed: false };
    });
  }
}

/** JSON with object keys sorted, so equal requests hash equally whatever their key order. */
function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_k, v: unknown) =>
    v && typeof v === "object" && !Array.isArray(v) && !Buffer.isBuffer(v)
      ? Object.fromEntries(Object.entries(v as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
      : v,
  );
}
