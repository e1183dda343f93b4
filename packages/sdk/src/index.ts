/**
 * @cocoon/sdk — the TypeScript client of the Cocoon HTTP API (API.md), built
 * on the global fetch, with no runtime dependencies.
 */
export { CocoonClient, DEFAULT_TIMEOUT_MS, type CocoonClientOpts } from "./client.ts";
export { MicroVms, MicroVm, Files, type Command, type FileData } from "./microvms.ts";
export { Images } from "./images.ts";
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
  CapacityExceededError,
  InternalError,
  TimeoutError,
  ConnectionError,
  type CocoonErrorCode,
  type CocoonErrorInit,
} from "./errors.ts";
export type * from "./types.ts";
