import type { FastifyError } from "fastify";
import type { ErrorCode } from "../../errors.ts";
import { toApiError } from "../error-mapping.ts";

/**
 * Errors of the AWS front door, as the AWS SDK parses them: the type in the
 * `x-amzn-errortype` header and in `__type`, the text in `message`. The
 * client turns the types of its model into its own exception classes.
 */
export type AwsErrorType =
  | "ValidationException"
  | "ResourceNotFoundException"
  | "ConflictException"
  | "ServiceQuotaExceededException"
  | "InsufficientCapacityException"
  | "ThrottlingException"
  | "AccessDeniedException"
  | "InternalServerException"
  // SigV4 failures, with the types and status AWS itself answers (the client's retry logic knows them).
  | "MissingAuthenticationTokenException"
  | "IncompleteSignatureException"
  | "InvalidSignatureException"
  | "UnrecognizedClientException"
  | "UnknownOperationException";

/**
 * Cocoon's registered codes (src/errors.ts) → the AWS types, each with the
 * HTTP status the client's model gives it. Exhaustive: a new code without a
 * line here does not compile.
 */
const FROM_COCOON: Record<ErrorCode, { type: AwsErrorType; status: number }> = {
  ValidationError: { type: "ValidationException", status: 400 },
  CommandNotFound: { type: "ValidationException", status: 400 },
  PayloadTooLarge: { type: "ValidationException", status: 400 },
  RequestTimeout: { type: "ValidationException", status: 400 },
  UnsupportedMediaType: { type: "ValidationException", status: 400 },
  HeadersTooLarge: { type: "ValidationException", status: 400 },
  Unauthorized: { type: "UnrecognizedClientException", status: 403 },
  Forbidden: { type: "AccessDeniedException", status: 403 },
  NotFound: { type: "ResourceNotFoundException", status: 404 },
  InvalidState: { type: "ConflictException", status: 409 },
  Conflict: { type: "ConflictException", status: 409 },
  // Cluster: the VM is another node's; the message names it.
  MisdirectedRequest: { type: "ConflictException", status: 409 },
  QuotaExceeded: { type: "ServiceQuotaExceededException", status: 402 },
  RateLimited: { type: "ThrottlingException", status: 429 },
  CapacityExceeded: { type: "InsufficientCapacityException", status: 500 },
  Internal: { type: "InternalServerException", status: 500 },
  // The VM's app or agent failed, not the service: a server error the client may retry.
  BadGateway: { type: "InternalServerException", status: 502 },
};

/** A failure that exists only at this edge (signatures, unknown operations). */
export class AwsError extends Error {
  constructor(
    readonly type: AwsErrorType,
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = "AwsError";
  }
}

export interface AwsErrorResponse {
  status: number;
  type: AwsErrorType;
  body: Record<string, unknown>;
  /** Seconds, for Retry-After (throttling). */
  retryAfterSeconds?: number;
}

/** Maps anything thrown under the AWS door; 5xx details stay in the server log. */
export function toAwsError(err: FastifyError | Error): AwsErrorResponse {
  if (err instanceof AwsError) return response(err.type, err.status, err.message);
  const known = toApiError(err);
  if (known) {
    const { type, status } = FROM_COCOON[known.code];
    if (status >= 500 && known.code === "Internal") return response(type, status, "internal error; see the server log");
    const d = known.details ?? {};
    const extra: Record<string, unknown> = {};
    if (typeof d.resourceId === "string") extra.resourceId = d.resourceId;
    if (typeof d.resourceType === "string") extra.resourceType = d.resourceType;
    if (type === "ServiceQuotaExceededException" && typeof d.quota === "string") extra.quotaCode = d.quota;
    const res = response(type, status, known.message, extra);
    return type === "ThrottlingException" ? { ...res, retryAfterSeconds: 5, body: { ...res.body, retryAfterSeconds: 5 } } : res;
  }
  const fastify = err as FastifyError;
  if (fastify.validation) {
    const first = fastify.validation[0];
    const field = `${first?.instancePath?.replace(/^\//, "").replace(/\//g, ".") || fastify.validationContext || "request"}`;
    const unknown = (first?.params as { additionalProperty?: string } | undefined)?.additionalProperty;
    return response("ValidationException", 400, unknown ? `${field}: unknown field ${unknown}` : `${field} ${first?.message ?? "is invalid"}`);
  }
  if (fastify.statusCode && fastify.statusCode >= 400 && fastify.statusCode < 500) return response("ValidationException", 400, fastify.message);
  return response("InternalServerException", 500, "internal error; see the server log");
}

function response(type: AwsErrorType, status: number, message: string, extra: Record<string, unknown> = {}): AwsErrorResponse {
  return { status, type, body: { __type: type, message, ...extra } };
}
