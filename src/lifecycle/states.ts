import { ApiError } from "../errors.ts";

/**
 * MicroVM states (DESIGN.md):
 *
 *   PENDING ──> RUNNING ──suspend──> SUSPENDING ──> SUSPENDED ──resume──> RESUMING ──> RUNNING
 *   any live ──terminate──> TERMINATING ──> TERMINATED
 *   any ──(process died, restore failed)──> FAILED ──terminate──> TERMINATING
 *
 * Only lifecycle/microvms.ts writes the state column, and only through
 * `checkTransition`.
 */
export const MICROVM_STATES = ["PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "RESUMING", "TERMINATING", "TERMINATED", "FAILED"] as const;
export type MicroVmState = (typeof MICROVM_STATES)[number];

const TRANSITIONS: Record<MicroVmState, readonly MicroVmState[]> = {
  PENDING: ["RUNNING", "FAILED", "TERMINATING"],
  RUNNING: ["SUSPENDING", "TERMINATING", "FAILED"],
  // A failed suspend leaves the guest running; a failed resume leaves it suspended.
  SUSPENDING: ["SUSPENDED", "RUNNING", "FAILED"],
  SUSPENDED: ["RESUMING", "TERMINATING", "FAILED"],
  RESUMING: ["RUNNING", "SUSPENDED", "FAILED"],
  TERMINATING: ["TERMINATED", "FAILED"],
  TERMINATED: [],
  FAILED: ["TERMINATING"],
};

/** Throws InvalidState (409) naming both states if `from → to` is not allowed. */
export function checkTransition(id: string, from: MicroVmState, to: MicroVmState, action: string): void {
  if (!TRANSITIONS[from].includes(to)) {
    throw new ApiError("InvalidState", `cannot ${action} microVM ${id}: it is ${from}`, { state: from, action });
  }
}

/** States in which a VM holds host CPU and memory (counted by admission control). */
export function holdsHostResources(state: MicroVmState): boolean {
  switch (state) {
    case "PENDING":
    case "RUNNING":
    case "SUSPENDING":
    case "RESUMING":
      return true;
    case "SUSPENDED":
    case "TERMINATING":
    case "TERMINATED":
    case "FAILED":
      return false;
    default: {
      const never: never = state;
      throw new Error(`unknown state ${String(never)}`);
    }
  }
}
