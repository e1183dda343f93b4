import { describe, expect, it } from "vitest";
import type { Snapshot } from "../../src/vmm/snapshot.ts";
import type { MicroVm } from "../../src/vmm/vm.ts";
import { WarmPool, type WarmPoolLimits } from "../../src/vmm/warm-pool.ts";

// The pool's scheduling only: the engine's restores are stood in for by
// promises the test settles (the real ones are test/vmm and test/server/faults).
const snapshot = { dir: "/snap" } as Snapshot;

function harness(limits: Partial<WarmPoolLimits> = {}) {
  const restores: { resolve: () => void; reject: (err: Error) => void; done?: boolean }[] = [];
  const destroyed: string[] = [];
  let made = 0;
  const pool = new WarmPool(
    { size: 1, max: 4, concurrency: 2, shrinkAfterMs: 60_000, ...limits },
    {
      restore: () => {
        const id = `vm${++made}`;
        return new Promise<MicroVm>((resolve, reject) => {
          const r: (typeof restores)[number] = {
            resolve: () => ((r.done = true), resolve({ id, agent: { exec: async () => ({}) } } as unknown as MicroVm)),
            reject: (err) => ((r.done = true), reject(err)),
          };
          restores.push(r);
        });
      },
      handOut: async (vm, id) => ({ ...vm, id: id ?? vm.id }) as MicroVm,
      destroy: async (vm) => void destroyed.push(vm.id),
    },
  );
  const settle = () => new Promise((r) => setTimeout(r, 0));
  /** Completes restores as the pool starts them until `until` resolves. */
  const complete = async (until: Promise<unknown>) => {
    let over = false;
    void until.then(() => (over = true));
    while (!over) {
      restores.filter((r) => !r.done).forEach((r) => r.resolve());
      await settle();
    }
  };
  return { pool, restores, destroyed, settle, complete };
}

describe("WarmPool", () => {
  it("serves a burst in launch order, restoring `concurrency` at a time, and grows for the next one", async () => {
    const { pool, restores, settle, complete } = harness();
    const fill = pool.fill(snapshot);
    await settle();
    expect(restores).toHaveLength(1);
    restores[0]!.resolve();
    await fill;

    const burst = Array.from({ length: 4 }, (_, i) => pool.take(snapshot, `user${i}`));
    const ids: string[] = [];
    burst.forEach((p) => void p.then((vm) => ids.push(vm!.id)));
    await settle();
    expect(ids).toEqual(["user0"]); // the ready one, at once
    expect(restores).toHaveLength(3); // two more under way, not one per waiting launch
    restores[1]!.resolve();
    await settle();
    expect(ids).toEqual(["user0", "user1"]);
    await complete(Promise.all(burst));
    expect(ids).toEqual(["user0", "user1", "user2", "user3"]);
    // Three launches found it empty: it now keeps 1 + 3 ready (its max is 4).
    await complete(pool.fill(snapshot));
    expect(restores.length).toBe(8);
    await pool.close();
  });

  it("lets waiting launches restore directly when the pool's restore fails", async () => {
    const { pool, restores, settle, complete } = harness({ size: 1 });
    const a = pool.take(snapshot, "a");
    const b = pool.take(snapshot, "b");
    await settle();
    restores[0]!.reject(new Error("QEMU failed to start"));
    expect(await a).toBeUndefined();
    expect(await b).toBeUndefined();
    await complete(pool.close());
  });

  it("is off at size 0 and ends every warm VM when closed", async () => {
    const off = harness({ size: 0 });
    expect(await off.pool.take(snapshot, "x")).toBeUndefined();
    expect(off.restores).toHaveLength(0);
    const { pool, restores, destroyed, settle } = harness({ size: 2 });
    const fill = pool.fill(snapshot);
    await settle();
    restores.forEach((r) => r.resolve());
    await fill;
    await pool.close();
    expect(destroyed.sort()).toEqual(["vm1", "vm2"]);
  });
});
