import { createHash } from "node:crypto";
import { ApiError } from "../../errors.ts";
import type { MicroVmState } from "../../lifecycle/states.ts";

/**
 * The shapes of `lambda-microvms-2025-09-09` (REST-JSON) that every
 * operation shares: ARNs and account ids, timestamps, states, pagination.
 */

/** The account of managed (built-in) images in their ARNs, as AWS-owned resources have. */
export const MANAGED_ACCOUNT = "aws";

/** A stable 12-digit account id of a tenant: the same tenant always gets the same one. */
export function accountOf(tenantId: string): string {
  const n = createHash("sha256").update(`cocoon-account:${tenantId}`).digest().readBigUInt64BE(0) % 10n ** 12n;
  return n.toString().padStart(12, "0");
}

export const imageArn = (region: string, tenantId: string, name: string) => `arn:aws:lambda:${region}:${accountOf(tenantId)}:microvm-image/${name}`;
export const managedImageArn = (region: string, name: string) => `arn:aws:lambda:${region}:${MANAGED_ACCOUNT}:microvm-image/${name}`;

export interface ParsedArn {
  region: string;
  account: string;
  type: string;
  id: string;
}

/** `arn:aws:lambda:{region}:{account}:{type}/{id}`; undefined if `value` is not such an ARN. */
export function parseArn(value: string): ParsedArn | undefined {
  const m = /^arn:aws:lambda:([a-z0-9-]*):([0-9]{12}|aws):([a-z-]+)\/([^/]+)$/.exec(value);
  return m ? { region: m[1]!, account: m[2]!, type: m[3]!, id: m[4]! } : undefined;
}

/**
 * A resource named by id/name or by ARN: an ARN of another account (another
 * tenant's) is NotFound, as on `/v1`; one of another resource type is a 400.
 * Managed images (`account` "aws") are accepted where `managed` says so.
 */
export function resourceName(value: string, tenantId: string, type: "microvm" | "microvm-image", field: string, managed = false): string {
  if (!value.startsWith("arn:")) return value;
  const arn = parseArn(value);
  if (!arn) throw new ApiError("ValidationError", `${field} ${value} is not an ARN arn:aws:lambda:{region}:{account}:${type}/{id}`, { field });
  if (arn.type !== type) throw new ApiError("ValidationError", `${field} names a ${arn.type}, not a ${type}`, { field });
  if (arn.account === accountOf(tenantId) || (managed && arn.account === MANAGED_ACCOUNT)) return arn.id;
  throw new ApiError("NotFound", `${type} ${value} not found`, { resourceId: value, resourceType: type });
}

/** Timestamps in REST-JSON bodies are epoch seconds (fractions allowed). */
export const epochSeconds = (iso: string) => Date.parse(iso) / 1000;

/**
 * Cocoon's MicroVM states in AWS's enum (PENDING, RUNNING, SUSPENDING,
 * SUSPENDED, TERMINATING, TERMINATED): RESUMING is not running yet, so
 * PENDING; FAILED has ended, so TERMINATED (its stateReason says why).
 */
export function awsMicroVmState(state: MicroVmState): string {
  switch (state) {
    case "PENDING":
    case "RESUMING":
      return "PENDING";
    case "RUNNING":
    case "SUSPENDING":
    case "SUSPENDED":
    case "TERMINATING":
    case "TERMINATED":
      return state;
    case "FAILED":
      return "TERMINATED";
    default: {
      const never: never = state;
      throw new Error(`unknown state ${String(never)}`);
    }
  }
}

/** maxResults: 1–100, default 100 (the page size every list answers with). */
export const PAGE = { min: 1, max: 100 } as const;

/** An opaque nextToken holding where the next page starts. */
export function encodePageToken(after: string | number): string {
  return Buffer.from(JSON.stringify({ after })).toString("base64url");
}

export function decodePageToken(token: string | undefined): string | number | undefined {
  if (token === undefined) return undefined;
  try {
    const after = (JSON.parse(Buffer.from(token, "base64url").toString("utf8")) as { after?: unknown }).after;
    if (typeof after === "string" || typeof after === "number") return after;
  } catch {
    // fall through
  }
  throw new ApiError("ValidationError", "nextToken is not a token this API returned", { field: "nextToken" });
}

/** One page of an in-memory list sorted by `key` (a tenant's images and versions are few). */
export function paginate<T>(items: T[], key: (item: T) => string | number, query: { maxResults?: number; nextToken?: string }): { items: T[]; nextToken?: string } {
  const after = decodePageToken(query.nextToken);
  const start = after === undefined ? 0 : items.findIndex((i) => key(i) > after);
  const rest = start < 0 ? [] : items.slice(start);
  const page = rest.slice(0, query.maxResults ?? PAGE.max);
  return { items: page, ...(rest.length > page.length ? { nextToken: encodePageToken(key(page.at(-1)!)) } : {}) };
}

/** An image version in the API is a decimal string ("1", "2", …). */
export function parseVersion(value: string, field = "imageVersion"): number {
  if (!/^[1-9][0-9]{0,8}$/.test(value)) throw new ApiError("ValidationError", `${field} must be a version number such as "1", got "${value.slice(0, 40)}"`, { field });
  return Number(value);
}
