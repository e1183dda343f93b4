/**
 * Errors thrown by the SDK. Every failure is a {@link CocoonError}; API errors
 * are the subclass of their `code` (the server's `{"error": {code, message,
 * details}}` body). The one exception: a call cancelled through your own
 * `signal` rejects with `signal.reason` (an `AbortError`), as `fetch` does.
 */

/** The error codes of the Cocoon API (API.md), plus the SDK's own `Timeout` and `Connection`. */
export type CocoonErrorCode =
  | "ValidationError"
  | "CommandNotFound"
  | "Unauthorized"
  | "Forbidden"
  | "NotFound"
  | "InvalidState"
  | "Conflict"
  | "PayloadTooLarge"
  | "RateLimited"
  | "CapacityExceeded"
  | "Internal"
  | "Timeout"
  | "Connection"
  | (string & {});

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
/** Thrown when the request body exceeds its limit (413). */
export class PayloadTooLargeError extends CocoonError {}
/** Thrown when a rate or quota limit was hit (429); retry later. */
export class RateLimitError extends CocoonError {}
/** Thrown when the host has no capacity for the VM right now (503); retry later. */
export class CapacityExceededError extends CocoonError {}
/** Thrown on a server fault (5xx); the server log has the details under `requestId`. */
export class InternalError extends CocoonError {}
/** Thrown when a call did not complete within its `timeoutMs`. */
export class TimeoutError extends CocoonError {}
/** Thrown when the server could not be reached (connection refused, reset, DNS). */
export class ConnectionError extends CocoonError {}

type ErrorClass = new (init: CocoonErrorInit) => CocoonError;

const BY_CODE: Record<string, ErrorClass> = {
  ValidationError,
  CommandNotFound: CommandNotFoundError,
  Unauthorized: UnauthorizedError,
  Forbidden: ForbiddenError,
  NotFound: NotFoundError,
  InvalidState: InvalidStateError,
  Conflict: ConflictError,
  PayloadTooLarge: PayloadTooLargeError,
  RateLimited: RateLimitError,
  CapacityExceeded: CapacityExceededError,
  Internal: InternalError,
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
  const cls = (code && BY_CODE[code]) || fallback[1];
  return new cls({ code: code ?? fallback[0], status, message, details, requestId });
}
