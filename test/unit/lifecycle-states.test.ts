import { describe, expect, it } from "vitest";
import { canTransition, decideNodeFailure, MICROVM_STATES, reconcileState, statesBefore, type MicroVmState } from "../../src/lifecycle/states.ts";
import type { VmStatus } from "../../src/vmm/vm.ts";

describe("the MicroVM state machine", () => {
  it("reaches every state from PENDING", () => {
    const seen = new Set<MicroVmState>(["PENDING"]);
    for (let grew = true; grew; ) {
      grew = false;
      for (const from of [...seen]) {
        for (const to of MICROVM_STATES) {
          if (canTransition(from, to) && !seen.has(to)) {
            seen.add(to);
            grew = true;
          }
        }
      }
    }
    expect([...seen].sort()).toEqual([...MICROVM_STATES].sort());
  });

  it("enters a state only from the states it may follow (the condition of the write)", () => {
    expect(statesBefore("SUSPENDING")).toEqual(["RUNNING"]);
    expect(statesBefore("RUNNING").sort()).toEqual(["PENDING", "RESUMING", "SUSPENDING"]);
    expect(statesBefore("TERMINATED")).toEqual(["TERMINATING"]);
    expect(statesBefore("PENDING")).toEqual([]);
    expect(canTransition("TERMINATED", "FAILED")).toBe(false);
  });
});

const ENGINE: (VmStatus | undefined)[] = [undefined, "running", "paused", "suspended", "failed"];
const ROWS: MicroVmState[] = ["PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "RESUMING", "TERMINATING"];

describe("reconcileState", () => {
  const table: Record<MicroVmState, Record<string, MicroVmState>> = {
    PENDING: { none: "FAILED", running: "FAILED", paused: "FAILED", suspended: "FAILED", failed: "FAILED" },
    RUNNING: { none: "FAILED", running: "RUNNING", paused: "FAILED", suspended: "FAILED", failed: "FAILED" },
    SUSPENDING: { none: "FAILED", running: "RUNNING", paused: "FAILED", suspended: "SUSPENDED", failed: "FAILED" },
    SUSPENDED: { none: "FAILED", running: "FAILED", paused: "FAILED", suspended: "SUSPENDED", failed: "FAILED" },
    RESUMING: { none: "FAILED", running: "RUNNING", paused: "FAILED", suspended: "SUSPENDED", failed: "FAILED" },
    TERMINATING: { none: "TERMINATED", running: "TERMINATED", paused: "TERMINATED", suspended: "TERMINATED", failed: "TERMINATED" },
    TERMINATED: {},
    FAILED: {},
  };
  for (const row of ROWS) {
    for (const engine of ENGINE) {
      it(`${row} with the engine's VM ${engine ?? "gone"} → ${table[row][engine ?? "none"]}`, () => {
        const r = reconcileState(row, engine, "boom");
        expect(r.state).toBe(table[row][engine ?? "none"]);
        // Every resulting state is reachable from the row's by the machine (or is FAILED/TERMINATED, always allowed here).
        if (r.state !== row) expect(canTransition(row, r.state)).toBe(true);
        // The engine's VM is ended exactly when it exists, is not failed already, and has no future.
        const ended = engine !== undefined && (row === "PENDING" || row === "TERMINATING" || (r.state === "FAILED" && engine !== "failed"));
        expect(r.endEngineVm).toBe(ended);
        if (r.state === "FAILED") expect(r.reason).toBeTruthy();
      });
    }
  }
});

describe("decideNodeFailure: the VMs of a node whose lease expired", () => {
  const REASON = "node b stopped renewing its lease";
  const AT = "2026-11-25T00:00:00.000Z";
  const LOST = `restored from its last durable suspend (${AT}) after ${REASON}: its state since ${AT} is lost`;
  // Per state: without opting in; opted in with a restore point; opted in without one.
  const table: Record<MicroVmState, [string | undefined, string | undefined, string | undefined]> = {
    PENDING: [REASON, `${REASON} while it was PENDING`, `${REASON} while it was PENDING`],
    RUNNING: [REASON, LOST, `${REASON}; it has no restore point to be restored from (none of its suspends was published to the object store)`],
    SUSPENDING: [REASON, LOST, `${REASON}; it has no restore point to be restored from (none of its suspends was published to the object store)`],
    RESUMING: [REASON, LOST, `${REASON}; it has no restore point to be restored from (none of its suspends was published to the object store)`],
    TERMINATING: [REASON, `${REASON} while it was TERMINATING`, `${REASON} while it was TERMINATING`],
    SUSPENDED: [undefined, undefined, undefined],
    TERMINATED: [undefined, undefined, undefined],
    FAILED: [undefined, undefined, undefined],
  };
  for (const state of MICROVM_STATES) {
    const [fail, restore, none] = table[state];
    it(`${state}: ${fail === undefined ? "left as it is" : restore === LOST ? "restored when opted in with a restore point, else FAILED" : "FAILED"}`, () => {
      const outcome = (onNodeFailure: "fail" | "restore", restorePointAt: string | null) => {
        const o = decideNodeFailure({ state, onNodeFailure, restorePointAt }, REASON);
        return o === undefined ? undefined : o.action === "fail" ? o.reason : o.message;
      };
      expect(outcome("fail", null)).toBe(fail);
      expect(outcome("fail", AT)).toBe(fail);
      expect(outcome("restore", AT)).toBe(restore);
      expect(outcome("restore", null)).toBe(none);
      const restored = decideNodeFailure({ state, onNodeFailure: "restore", restorePointAt: AT }, REASON);
      // Restored only from a live state that holds a guest, never from one being created or ended.
      expect(restored?.action === "restore").toBe(["RUNNING", "SUSPENDING", "RESUMING"].includes(state));
    });
  }
});
