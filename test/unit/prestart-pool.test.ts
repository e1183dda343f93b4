import { describe, expect, it } from "vitest";
import { PrestartPool } from "../../src/vmm/prestart-pool.ts";
import type { Snapshot } from "../../src/vmm/snapshot.ts";
import type { MicroVm } from "../../src/vmm/vm.ts";

// The pool's choices only: the engine's starts are stood in for by promises
// the test settles (the real ones: test/engine/lifecycle.test.ts "pre-started processes").
const snapshot = (dir: string, createdAt = "t1") => ({ dir, manifest: { createdAt } }) as Snapshot;
const A = snapshot("/a");
const B = snapshot("/b");

function harness(capacity: number) {
  const starts: { dir: string; resolve: () => void; reject: (err: Error) => void }[] = [];
  const released: string[] = [];
  const made: MicroVm[] = [];
  const pool = new PrestartPool(capacity, {
    start: (s) =>
      new Promise<MicroVm>((resolve, reject) => {
        const n = made.length + 1;
        const vm = { id: `p${n}:${s.dir}`, record: { pid: 1000 + n, processName: `p${n}` } } as unknown as MicroVm;
        made.push(vm);
        starts.push({ dir: s.dir, resolve: () => resolve(vm), reject });
      }),
    release: async (vm) => void released.push(vm.id),
  });
  const settle = () => new Promise((r) => setTimeout(r, 0));
  const startAll = async () => {
    starts.splice(0).forEach((s) => s.resolve());
    await settle();
  };
  return { pool, starts, released, made, settle, startAll };
}

describe("PrestartPool", () => {
  it("is off at capacity 0", () => {
    const { pool, starts } = harness(0);
    pool.replenish(A);
    expect(starts).toEqual([]);
    expect(pool.take(A)).toBeUndefined();
  });

  it("hands out only a ready process of the snapshot, oldest first, and a run of launches grows it to capacity", async () => {
    const { pool, starts, startAll } = harness(2);
    expect(pool.take(A)).toBeUndefined(); // a miss: the launch starts its own process
    pool.replenish(A);
    expect(pool.take(A)).toBeUndefined(); // still starting
    pool.replenish(A); // a second launch before the first start ended
    pool.replenish(A); // capacity reached: no third
    expect(starts.map((s) => s.dir)).toEqual(["/a", "/a"]);
    expect(pool.pids()).toEqual([undefined, undefined]);
    await startAll();
    expect(pool.pids()).toEqual([1001, 1002]);
    expect(pool.take(B)).toBeUndefined(); // another snapshot's processes do not fit it
    expect(pool.take(A)?.id).toBe("p1:/a");
    expect(pool.take(A)?.id).toBe("p2:/a");
    expect(pool.take(A)).toBeUndefined();
  });

  it("makes room for the snapshot launched now by ending the oldest ready process of another", async () => {
    const { pool, starts, released, startAll } = harness(2);
    pool.replenish(A);
    pool.replenish(B);
    await startAll();
    pool.replenish(B);
    expect(released).toEqual(["p1:/a"]);
    expect(starts.map((s) => s.dir)).toEqual(["/b"]);
    await startAll();
    expect(pool.take(A)).toBeUndefined();
    // A snapshot rebuilt in the same directory is another snapshot.
    expect(pool.take(snapshot("/b", "t2"))).toBeUndefined();
    expect(pool.take(B)?.id).toBe("p2:/b");
  });

  it("forgets a failed start and a process that ended by itself, but not one a launch took", async () => {
    const { pool, starts, made, released, settle } = harness(1);
    pool.replenish(A);
    starts.shift()!.reject(new Error("no QEMU"));
    await settle();
    expect(pool.pids()).toEqual([]);
    pool.replenish(A);
    starts.shift()!.resolve();
    await settle();
    const taken = pool.take(A)!;
    expect(pool.remove(taken)).toBe(false); // the launch owns it now: the engine must not release it as the pool's
    pool.replenish(A);
    starts.shift()!.resolve();
    await settle();
    expect(pool.pids()).toEqual([made[2]!.record.pid]);
    expect(pool.remove(made[2]!)).toBe(true); // its QEMU exited while it waited: the engine releases it
    expect(pool.take(A)).toBeUndefined();
    expect(released).toEqual([]);
  });

  it("drops a deleted snapshot's processes and ends all of them on close, starts under way included", async () => {
    const { pool, starts, released, startAll } = harness(3);
    pool.replenish(A);
    pool.replenish(B);
    await startAll();
    await pool.drop("/a");
    expect(released).toEqual(["p1:/a"]);
    pool.replenish(B);
    const closed = pool.close();
    pool.replenish(B); // closing: nothing more starts
    expect(starts).toHaveLength(1);
    starts.shift()!.resolve(); // the start under way ends after close began: released too
    await closed;
    expect(released.sort()).toEqual(["p1:/a", "p2:/b", "p3:/b"]);
    expect(pool.pids()).toEqual([]);
    expect(pool.take(B)).toBeUndefined();
  });
});
