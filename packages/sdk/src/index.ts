/**
 * @cocoon/sdk — the TypeScript client of the Cocoon HTTP API (docs/api.md), built
 * on the global fetch, with no runtime dependencies.
 */
export { CocoonClient, DEFAULT_TIMEOUT_MS, type CocoonClientOpts } from "./client.ts";
export { MicroVms, MicroVm, Files, type Command, type FileData } from "./microvms.ts";
export { Images } from "./images.ts";
export { Volumes } from "./volumes.ts";
export { Keys, Tenants } from "./admin.ts";
export type { CallOpts } from "./http.ts";
export {
  CocoonError,
  ValidationError,
  CommandNotFoundError,
  UnauthorizedError,
  ForbiddenError,
  NotFoundError,
  InvalidStateError,
  ConflictError,
  PayloadTooLargeError,
  RateLimitError,
  QuotaExceededError,
  CapacityExceededError,
  InternalError,
  BadGatewayError,
  MisdirectedRequestError,
  TimeoutError,
  ConnectionError,
  type CocoonErrorCode,
  type CocoonErrorInit,
} from "./errors.ts";
export type * from "./types.ts";
// The API's enumerations as values, from the generated types (also importable alone as @cocoon/sdk/api).
export { microVmStateValues as MICROVM_STATES, imageStateValues as IMAGE_STATES, errorCodeValues as API_ERROR_CODES } from "./api.gen.ts";
