import type { VmStatus } from "./vm.ts";

/** What a restarted server finds of one VM: its record and the facts on the host. */
export interface AdoptionFacts {
  status: VmStatus;
  /** A warm-pool VM never handed out. */
  pooled: boolean;
  /** Its recorded QEMU pid is alive and still its QEMU. */
  processAlive: boolean;
  /** That QEMU's vCPUs are stopped (a suspend or a pause was under way); only meaningful when alive. */
  processPaused: boolean;
  /** A complete saved state (`suspended.state`) is on disk. */
  savedState: boolean;
}

/**
 * What to do with it:
 * - `discard`: end everything it holds on the host and remove it (it was
 *   never handed out, or its launch was cut short);
 * - `attach`: keep its running process (`cont`: continue its vCPUs, stopped
 *   by a suspend that did not complete) as `status`; a saved state that was
 *   never recorded is dropped;
 * - `suspend`: it is suspended (its saved state is complete): end any
 *   process it still has (a resume cut short) and record it so;
 * - `fail`: it is lost: end what it holds and record the reason;
 * - `keep-failed`: it had failed already: end anything it still holds.
 */
export type Adoption =
  | { action: "discard" }
  | { action: "attach"; status: "running" | "paused"; cont: boolean }
  | { action: "suspend" }
  | { action: "fail"; reason: string }
  | { action: "keep-failed" };

/**
 * Decides what a restarted server does with a VM it finds on disk. Pure: the
 * engine gathers the facts, acts on the answer, and every combination has a
 * unit test (test/unit/adoption.test.ts).
 *
 * The engine's write order makes these the only explanations: a launch
 * records `starting` before QEMU starts and `running` once the guest is
 * re-keyed; a suspend renames a complete state into place before it records
 * `suspended`, and only then ends the process; a resume records `running`
 * once the guest is re-keyed, and only then removes the saved state.
 */
export function decideAdoption(f: AdoptionFacts): Adoption {
  if (f.pooled) return { action: "discard" };
  switch (f.status) {
    case "starting":
      return { action: "discard" };
    case "running":
    case "paused":
      // A live process is the truth, even if a suspend wrote a state first:
      // that save was never recorded, so the guest runs on (or stays paused).
      if (f.processAlive) return { action: "attach", status: f.status, cont: f.status === "running" && f.processPaused };
      // The process ended after a suspend's state was complete, before the record said so.
      if (f.savedState) return { action: "suspend" };
      return { action: "fail", reason: "QEMU process was gone when the server restarted" };
    case "suspended":
      return f.savedState ? { action: "suspend" } : { action: "fail", reason: "suspended state file is missing" };
    case "failed":
      return { action: "keep-failed" };
    default: {
      const never: never = f.status;
      throw new Error(`unknown VM status ${String(never)}`);
    }
  }
}
