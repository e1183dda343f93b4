import { describe, expect, it } from "vitest";
import { canTransition, MICROVM_STATES, reconcileState, statesBefore, type MicroVmState } from "../../src/lifecycle/states.ts";
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
