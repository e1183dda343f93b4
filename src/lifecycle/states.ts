import { ApiError } from "../errors.ts";
import { MICROVM_STATES, type MicroVmState, type NodeFailurePolicy } from "../store/schema.ts";
import type { VmStatus } from "../vmm/engine.ts";

export { MICROVM_STATES, type MicroVmState };

/**
 * MicroVM states (docs/architecture.md):
 *
 *   PENDING ──launched──> RUNNING ──suspend──> SUSPENDING ──> SUSPENDED ──resume──> RESUMING ──> RUNNING
 *   PENDING | RUNNING | SUSPENDED | FAILED ──terminate──> TERMINATING ──> TERMINATED
 *   any but TERMINATED ──(launch failed, process died, lost in a restart)──> FAILED
 *   RUNNING | SUSPENDING | RESUMING ──(its node failed; opted in, with a restore point)──> SUSPENDED
 *
 * A failed suspend leaves the guest running; a failed resume leaves it
 * suspended. `MicroVmService.transition` is the only writer of the state
 * column, and the write itself is conditional on the current state being one
 * the target may follow: an illegal transition changes nothing and is a 409.
 */
const TRANSITIONS: Record<MicroVmState, readonly MicroVmState[]> = {
  PENDING: ["RUNNING", "FAILED", "TERMINATING"],
  RUNNING: ["SUSPENDING", "TERMINATING", "FAILED"],
  SUSPENDING: ["SUSPENDED", "RUNNING", "FAILED"],
  SUSPENDED: ["RESUMING", "TERMINATING", "FAILED"],
  RESUMING: ["RUNNING", "SUSPENDED", "FAILED"],
  TERMINATING: ["TERMINATED", "FAILED"],
  TERMINATED: [],
  FAILED: ["TERMINATING"],
};

/** The states `to` may be entered from: the condition of the write that enters it. */
export function statesBefore(to: MicroVmState): MicroVmState[] {
  return MICROVM_STATES.filter((from) => TRANSITIONS[from].includes(to));
}

export function canTransition(from: MicroVmState, to: MicroVmState): boolean {
  return TRANSITIONS[from].includes(to);
}

/** Throws InvalidState (409) naming both states if `from → to` is not allowed. */
export function checkTransition(id: string, from: MicroVmState, to: MicroVmState, action: string): void {
  if (!canTransition(from, to)) throw invalidState(id, from, action);
}

export function invalidState(id: string, from: MicroVmState, action: string): ApiError {
  return new ApiError("InvalidState", `cannot ${action} microVM ${id}: it is ${from}`, { state: from, action });
}

/** The live states a VM may be restored from when its node fails (decideNodeFailure): not one being created or ended. */
export const RESTORABLE_STATES: readonly MicroVmState[] = ["RUNNING", "SUSPENDING", "RESUMING"];

/** What a VM of a failed node knows of itself. */
export interface NodeFailureFacts {
  state: MicroVmState;
  onNodeFailure: NodeFailurePolicy;
  /** When its restore point (its last published suspend) was suspended; null: it has none. */
  restorePointAt: string | null;
}

export type NodeFailureOutcome = { action: "fail"; reason: string } | { action: "restore"; message: string };

/**
 * What becomes of a VM of a node that failed (`reason`: why, naming the
 * node), undefined for one that is not live (suspended VMs keep their files
 * on the node, or in the object store; ended ones stay so). A live VM is
 * FAILED unless it opted in (`onNodeFailure: "restore"`), is running (or
 * suspending or resuming) and has a restore point: then it is SUSPENDED at
 * that point, and the event says what is lost. Pure; unit-tested
 * (test/unit/lifecycle-states.test.ts). Only for a node whose lease expired:
 * its lease fence ended its QEMUs before that (lease-fence.ts).
 */
export function decideNodeFailure(vm: NodeFailureFacts, reason: string): NodeFailureOutcome | undefined {
  if (!holdsHostResources(vm.state) && vm.state !== "TERMINATING") return undefined;
  if (vm.onNodeFailure !== "restore") return { action: "fail", reason };
  if (!RESTORABLE_STATES.includes(vm.state)) return { action: "fail", reason: `${reason} while it was ${vm.state}` };
  if (vm.restorePointAt === null) return { action: "fail", reason: `${reason}; it has no restore point to be restored from (none of its suspends was published to the object store)` };
  return { action: "restore", message: `restored from its last durable suspend (${vm.restorePointAt}) after ${reason}: its state since ${vm.restorePointAt} is lost` };
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

/** What a restart makes of a VM's row: its state, why, and whether the engine's VM must be ended. */
export interface Reconciled {
  state: MicroVmState;
  reason?: string;
  /** The engine still has the VM but it has no future (a create cut short, a terminate to finish). */
  endEngineVm: boolean;
}

/**
 * Reconciles a row left in `row` (a state other than TERMINATED or FAILED)
 * with what the engine re-adopted (`engine`: undefined when it has no such
 * VM). Pure; every combination is unit-tested (test/unit/lifecycle.test.ts).
 * An operation cut short by the restart ends as the engine's truth says: a
 * suspend whose state was recorded is SUSPENDED, one that was not has the
 * VM RUNNING on; a create cut short is FAILED (its caller got no answer, and
 * its environment may not have been applied), a terminate is finished.
 */
export function reconcileState(row: MicroVmState, engine: VmStatus | undefined, engineReason?: string): Reconciled {
  const lost = (reason: string): Reconciled => ({ state: "FAILED", reason, endEngineVm: engine !== undefined && engine !== "failed" });
  if (row === "PENDING") return { ...lost("the server restarted while the microVM was being created"), endEngineVm: engine !== undefined };
  if (row === "TERMINATING") return { state: "TERMINATED", endEngineVm: engine !== undefined };
  const truth: MicroVmState | undefined = engine === "running" ? "RUNNING" : engine === "suspended" ? "SUSPENDED" : undefined;
  if (truth === undefined) {
    if (engine === undefined) return lost("the microVM was lost while the server was down");
    return lost(engine === "failed" ? (engineReason ?? "its process failed") : `found ${engine} after a restart`);
  }
  if (truth === row || canTransition(row, truth)) return { state: truth, endEngineVm: false };
  return lost(`the record said ${row} but the microVM was ${truth} after a restart`);
}
