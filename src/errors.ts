/**
 * The one registry of error codes the API returns: each with its HTTP status
 * and when it is used. Bodies are `{"error": {code, message, details?}}`;
 * 5xx details are logged with the request id, never sent.
 */
export const ERROR_CODES = {
  ValidationError: { status: 400, doc: "The request is malformed or a field is out of range; the message names the field and the limit." },
  CommandNotFound: { status: 400, doc: "exec: the program does not exist in the VM." },
  Unauthorized: { status: 401, doc: "No API key, or an unknown or revoked one." },
  Forbidden: { status: 403, doc: "The key lacks the permission the route needs, or a browser request authenticated only by a cookie came from another origin." },
  NotFound: { status: 404, doc: "No such resource in the caller's tenant (another tenant's resources do not exist)." },
  RequestTimeout: { status: 408, doc: "The request (headers or body) did not arrive within the server's time limit." },
  InvalidState: { status: 409, doc: "The resource is in a state that does not allow the action; the message names both." },
  Conflict: { status: 409, doc: "The resource already exists or is in use." },
  MisdirectedRequest: { status: 421, doc: "Cluster (docs/cluster.md): the microVM is run by another node; details.node and details.url name it. Send the request there." },
  PayloadTooLarge: { status: 413, doc: "The request body exceeds its limit." },
  UnsupportedMediaType: { status: 415, doc: "The route does not take a body of that Content-Type (JSON routes take application/json)." },
  QuotaExceeded: { status: 429, doc: "A quota of the tenant or of a resource is reached (e.g. 50 tags per resource); the message names it and the limit." },
  RateLimited: { status: 429, doc: "Too many requests of this kind are in progress (e.g. image builds waiting for a slot); retry later." },
  HeadersTooLarge: { status: 431, doc: "The request's headers exceed the server's limit (16 KiB)." },
  CapacityExceeded: { status: 503, doc: "The host has no capacity for the VM right now; retry later." },
  Internal: { status: 500, doc: "A server fault; details are in the server log under the request id." },
  BadGateway: { status: 502, doc: "A VM's app or agent answered garbage (an invalid status, a malformed response) or did not answer; or (cluster) an object from the object store failed its size or checksum." },
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** Thrown anywhere below the API to produce a registered error response. */
export class ApiError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
    this.name = "ApiError";
  }

  get status(): number {
    return ERROR_CODES[this.code].status;
  }
}

/**
 * Thrown when cocoon-agent (the guest) refuses a request or answers garbage;
 * `code` is the agent's error code (agent/PROTOCOL.md). The API maps it to
 * its own codes in one place (the error handler): the guest is not trusted,
 * so its 5xx is the host's 502, and its message is passed on only for 4xx.
 */
export class AgentError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = "AgentError";
  }
}

/** Thrown below the API for a bad argument; names the field and the limit. The API answers it as ValidationError. */
export class InvalidArgumentError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(message);
    this.name = "InvalidArgumentError";
  }
}

/** Throws InvalidArgumentError unless `value` is an integer in [min, max]. */
export function checkIntRange(field: string, value: number, limits: { min: number; max: number }): void {
  if (!Number.isInteger(value) || value < limits.min || value > limits.max) {
    throw new InvalidArgumentError(field, `${field} must be an integer between ${limits.min} and ${limits.max}, got ${value}`);
  }
}

/** Thrown for a request that cannot be honoured in the VM's current status. */
export class InvalidVmStateError extends Error {
  constructor(
    readonly vmId: string,
    /** The engine's status of the VM (vmm/vm.ts VmStatus). */
    readonly status: string,
    action: string,
  ) {
    super(`cannot ${action} microVM ${vmId}: it is ${status}`);
    this.name = "InvalidVmStateError";
  }
}

export class VmNotFoundError extends Error {
  constructor(readonly vmId: string) {
    super(`microVM ${vmId} not found`);
    this.name = "VmNotFoundError";
  }
}

/**
 * Thrown when a snapshot cannot be launched or resumed on this host: it was
 * made by another QEMU build, under another accelerator, or in an older
 * layout. The message says what differs and `action` what to do: rebuild
 * the image, or, for a VM suspended under another build, end it.
 */
export class SnapshotIncompatibleError extends Error {
  constructor(
    /** What differs. */
    readonly reason: string,
    readonly action = "rebuild the image (a build on this host makes a snapshot it can restore)",
    /** Which of the three differs: the snapshot layout of an older Cocoon, the accelerator, or the QEMU build. */
    readonly differs: "format" | "accelerator" | "build" = "build",
  ) {
    super(`${reason}: ${action}`);
    this.name = "SnapshotIncompatibleError";
  }
}
