import { describe, expect, it } from "vitest";
import { decideAdoption, type Adoption, type AdoptionFacts } from "../../src/vmm/adoption.ts";
import type { VmStatus } from "../../src/vmm/vm.ts";

const STATUSES: VmStatus[] = ["starting", "running", "paused", "suspended", "failed"];

/** Every combination of (record, process alive, process paused, saved state present), pooled or not, and the answer. */
function expected(f: AdoptionFacts): Adoption {
  if (f.pooled || f.status === "starting") return { action: "discard" };
  if (f.status === "failed") return { action: "keep-failed" };
  if (f.status === "suspended") return f.savedState ? { action: "suspend" } : { action: "fail", reason: "suspended state file is missing" };
  if (f.processAlive) return { action: "attach", status: f.status, cont: f.status === "running" && f.processPaused };
  if (f.savedState) return { action: "suspend" };
  return { action: "fail", reason: "QEMU process was gone when the server restarted" };
}

const cases: AdoptionFacts[] = [];
for (const status of STATUSES)
  for (const pooled of [false, true])
    for (const processAlive of [false, true])
      for (const processPaused of [false, true])
        for (const savedState of [false, true]) cases.push({ status, pooled, processAlive, processPaused, savedState });

describe("decideAdoption", () => {
  it.each(cases.map((c) => [JSON.stringify(c), c] as const))("%s", (_, facts) => {
    expect(decideAdoption(facts)).toEqual(expected(facts));
  });

  it("names the cases that matter in words", () => {
    const f = (o: Partial<AdoptionFacts>): AdoptionFacts => ({ status: "running", pooled: false, processAlive: true, processPaused: false, savedState: false, ...o });
    // A suspend cut short before it was recorded: the guest runs on, its half-made state is dropped.
    expect(decideAdoption(f({ processPaused: true, savedState: true }))).toEqual({ action: "attach", status: "running", cont: true });
    // Its state was complete and the process already gone: it is suspended.
    expect(decideAdoption(f({ processAlive: false, savedState: true }))).toEqual({ action: "suspend" });
    // A resume cut short (recorded suspended, a new process running): the saved state wins.
    expect(decideAdoption(f({ status: "suspended", savedState: true }))).toEqual({ action: "suspend" });
    // A warm VM is never adopted, alive or not.
    expect(decideAdoption(f({ pooled: true }))).toEqual({ action: "discard" });
  });
});
