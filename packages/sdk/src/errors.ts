/**
 * Errors thrown by the SDK. Every failure is a {@link CocoonError}; API errors
 * are the subclass of their `code` (the server's `{"error": {code, message,
 * details}}` body). The one exception: a call cancelled through your own
 * `signal` rejects with `signal.reason` (an `AbortError`), as `fetch` does.
 */

import type { ApiErrorCode } from "./types.ts";

/** The error codes of the Cocoon API (generated from its OpenAPI document), plus the SDK's own `Timeout` and `Connection`. */
export type CocoonErrorCode = ApiErrorCode | "Timeout" | "Connection" | (string & {});

export interface CocoonErrorInit {
  /** The API error code, e.g. `NotFound`; `Timeout`/`Connection` for failures the SDK detects itself. */
  code: CocoonErrorCode;
  /** HTTP status; 0 when no response arrived. */
  status: number;
  message: string;
  /** Extra facts from the server, e.g. `{field: "memoryMiB"}` for a ValidationError. */
  details?: Record<string, unknown>;
  /** The `x-request-id` the call was sent with; the server logs 5xx details under it. */
  requestId?: string;
  cause?: unknown;
}

/** The root of every error the SDK throws. */
export class CocoonError extends Error {
  /** The API error code, e.g. `NotFound`. */
  readonly code: CocoonErrorCode;
  /** HTTP status; 0 when no response arrived (timeout, connection failure). */
  readonly status: number;
  /** Extra facts from the server, e.g. `{field: "memoryMiB"}`; `{}` when none. */
  readonly details: Record<string, unknown>;
  /** The request id the call was sent with (the server logs under it); undefined for failures before sending. */
  readonly requestId: string | undefined;

  constructor(init: CocoonErrorInit) {
    super(init.message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = new.target.name;
    this.code = init.code;
    this.status = init.status;
    this.details = init.details ?? {};
    this.requestId = init.requestId;
  }

  /** The field a ValidationError is about (`details.field`), when the server named one. */
  get field(): string | undefined {
    return typeof this.details.field === "string" ? this.details.field : undefined;
  }
}

/** Thrown when the request is malformed or a field is out of range (400); `field` names the field. */
export class ValidationError extends CocoonError {}
/** Thrown when exec's program does not exist in the VM (400). */
export class CommandNotFoundError extends CocoonError {}
/** Thrown when the API key is missing, unknown or revoked (401). */
export class UnauthorizedError extends CocoonError {}
/** Thrown when the API key lacks the permission the call needs (403); `details.permission` names it. */
export class ForbiddenError extends CocoonError {}
/** Thrown when the resource does not exist in the key's tenant (404). */
export class NotFoundError extends CocoonError {}
/** Thrown when the resource's state does not allow the action, e.g. suspending a SUSPENDED VM (409). */
export class InvalidStateError extends CocoonError {}
/** Thrown when the resource already exists or is in use (409). */
export class ConflictError extends CocoonError {}
/** Thrown when the request body (413) or its headers (431) exceed their limit. */
export class PayloadTooLargeError extends CocoonError {}
/** Thrown when too many requests of a kind are in progress (429); retry later. */
export class RateLimitError extends CocoonError {}
/** Thrown when a quota of the tenant or of a resource is reached (429); the message names it and the limit. */
export class QuotaExceededError extends CocoonError {}
/** Thrown when the host has no capacity for the VM right now (503); retry later. */
export class CapacityExceededError extends CocoonError {}
/** Thrown on a server fault (5xx); the server log has the details under `requestId`. */
export class InternalError extends CocoonError {}
/** Thrown when a VM's app or agent answered garbage or did not answer (502). */
export class BadGatewayError extends CocoonError {}
/** Thrown by a cluster node that does not run the VM and cannot forward to the node that does (421); `details.node` and `details.url` name it. */
export class MisdirectedRequestError extends CocoonError {}
/** Thrown when a call did not complete within its `timeoutMs`, or the server did not receive the request within its own limit (408). */
export class TimeoutError extends CocoonError {}
/** Thrown when the server could not be reached (connection refused, reset, DNS). */
export class ConnectionError extends CocoonError {}

type ErrorClass = new (init: CocoonErrorInit) => CocoonError;

/** Every code the API answers with has its class: a code added to the API fails to compile here until it has one. */
const BY_CODE: Record<ApiErrorCode, ErrorClass> = {
  ValidationError,
  UnsupportedMediaType: ValidationError,
  CommandNotFound: CommandNotFoundError,
  Unauthorized: UnauthorizedError,
  Forbidden: ForbiddenError,
  NotFound: NotFoundError,
  RequestTimeout: TimeoutError,
  InvalidState: InvalidStateError,
  Conflict: ConflictError,
  PayloadTooLarge: PayloadTooLargeError,
  HeadersTooLarge: PayloadTooLargeError,
  RateLimited: RateLimitError,
  QuotaExceeded: QuotaExceededError,
  CapacityExceeded: CapacityExceededError,
  Internal: InternalError,
  BadGateway: BadGatewayError,
  MisdirectedRequest: MisdirectedRequestError,
};

/** For bodies without a known code (a proxy's answer, a future code): the class of the status. */
const BY_STATUS: Record<number, [CocoonErrorCode, ErrorClass]> = {
  400: ["ValidationError", ValidationError],
  401: ["Unauthorized", UnauthorizedError],
  403: ["Forbidden", ForbiddenError],
  404: ["NotFound", NotFoundError],
  409: ["Conflict", ConflictError],
  413: ["PayloadTooLarge", PayloadTooLargeError],
  429: ["RateLimited", RateLimitError],
  503: ["CapacityExceeded", CapacityExceededError],
};

/** Builds the error for a non-2xx response from its status and (possibly absent or non-JSON) body. */
export function errorFromResponse(status: number, bodyText: string, requestId: string | undefined): CocoonError {
  let parsed: { code?: unknown; message?: unknown; details?: unknown } | undefined;
  try {
    const body = JSON.parse(bodyText) as { error?: typeof parsed };
    if (body && typeof body.error === "object" && body.error !== null) parsed = body.error;
  } catch {
    // not JSON: a proxy or a crash; described by the status below
  }
  const code = typeof parsed?.code === "string" ? parsed.code : undefined;
  const message = typeof parsed?.message === "string" ? parsed.message : `HTTP ${status}${bodyText ? `: ${bodyText.slice(0, 200)}` : ""}`;
  const details = parsed?.details && typeof parsed.details === "object" ? (parsed.details as Record<string, unknown>) : undefined;
  const fallback = BY_STATUS[status] ?? (status >= 500 ? (["Internal", InternalError] as const) : (["Unknown", CocoonError] as const));
  const cls = (code && Object.hasOwn(BY_CODE, code) && BY_CODE[code as ApiErrorCode]) || fallback[1];
  return new cls({ code: code ?? fallback[0], status, message, details, requestId });
}
