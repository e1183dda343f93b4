import { ApiError } from "../errors.ts";
import { IMAGE_STATES, type ImageState } from "../store/schema.ts";

export { IMAGE_STATES, type ImageState };

/**
 * Image states (docs/architecture.md):
 *
 *   PENDING ──build slot──> BUILDING ──snapshot published──> READY
 *   PENDING | BUILDING ──step failed, timeout, never ready, server restart──> FAILED
 *   READY | FAILED ──DELETE──> DELETING ──files removed──> (row deleted)
 *
 * Only images/service.ts writes the state column (`transition`: an UPDATE
 * conditional on the current state, so an illegal transition changes nothing).
 */

const TRANSITIONS: Record<ImageState, readonly ImageState[]> = {
  PENDING: ["BUILDING", "FAILED"],
  BUILDING: ["READY", "FAILED"],
  READY: ["DELETING"],
  FAILED: ["DELETING"],
  // A deletion that fails half-way is retried; the image is never usable again.
  DELETING: ["DELETING"],
};

/** The states `to` may be entered from: the condition of the write that enters it (`ImageService.transition`). */
export function imageStatesBefore(to: ImageState): ImageState[] {
  return IMAGE_STATES.filter((from) => TRANSITIONS[from].includes(to));
}

/** Throws InvalidState (409) naming both states if `from → to` is not allowed. */
export function checkImageTransition(id: string, from: ImageState, to: ImageState, action: string): void {
  if (!TRANSITIONS[from].includes(to)) throw invalidImageState(id, from, action);
}

export function invalidImageState(id: string, from: ImageState, action: string): ApiError {
  return new ApiError("InvalidState", `cannot ${action} image ${id}: it is ${from}`, { state: from, action });
}

/** True while a build is queued or running. */
export function isBuilding(state: ImageState): boolean {
  switch (state) {
    case "PENDING":
    case "BUILDING":
      return true;
    case "READY":
    case "FAILED":
    case "DELETING":
      return false;
    default: {
      const never: never = state;
      throw new Error(`unknown image state ${String(never)}`);
    }
  }
}
