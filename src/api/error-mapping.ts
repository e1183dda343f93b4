import { AgentError, ApiError, InvalidArgumentError, InvalidVmStateError, SnapshotIncompatibleError, VmNotFoundError } from "../errors.ts";

/**
 * The registered API error for anything typed that is thrown below the API,
 * or undefined for an unexpected error (a 500 whose details stay in the log).
 * The one mapping both front doors use (`/v1`'s handler, the AWS door's
 * `toAwsError`), so an error means the same through either.
 *
 * The guest's refusals (AgentError) pass on only as 4xx with their message:
 * the guest is not trusted, so its 5xx is the host's 502.
 */
export function toApiError(err: unknown): ApiError | undefined {
  if (err instanceof ApiError) return err;
  if (err instanceof InvalidArgumentError) return new ApiError("ValidationError", err.message, { field: err.field });
  if (err instanceof AgentError) {
    if (err.status === 404) return new ApiError("NotFound", err.message);
    if (err.status === 409) return new ApiError("Conflict", err.message);
    if (err.status === 400) return new ApiError(err.code === "CommandNotFound" ? "CommandNotFound" : "ValidationError", err.message);
    return new ApiError("BadGateway", `the microVM's agent failed: ${err.message}`);
  }
  // The engine's own view lagged the lifecycle's (a race with a VM's exit, say): the same answers as the lifecycle's.
  if (err instanceof InvalidVmStateError) return new ApiError("InvalidState", err.message, { state: err.status });
  if (err instanceof VmNotFoundError) return new ApiError("NotFound", err.message);
  // Restoring it needs a rebuild (or, for a VM suspended under another QEMU build, its end): nothing a retry fixes.
  if (err instanceof SnapshotIncompatibleError) return new ApiError("Conflict", err.message, { action: err.action });
  return undefined;
}
