import type { Snapshot } from "./snapshot.ts";
import type { MicroVm } from "./vm.ts";

/** What the pool needs of the engine. */
export interface WarmPoolOps {
  /** Restores a new VM from the snapshot, kept out of the engine's list (`pooled`). */
  restore(snapshot: Snapshot): Promise<MicroVm>;
  /** Makes a pooled VM the caller's: re-keyed, recorded under `id`, listed. */
  handOut(vm: MicroVm, id: string | undefined): Promise<MicroVm>;
  destroy(vm: MicroVm): Promise<void>;
  log?: (msg: string) => void;
}

export interface WarmPoolLimits {
  /** Warm VMs kept per snapshot when launches are rare (0: no pool at all). */
  size: number;
  /** The most a run of launches can grow a snapshot's pool to. */
  max: number;
  /** Restores under way at once per snapshot (they share the host's CPUs with running VMs). */
  concurrency: number;
  /** A pool grown past `size` gives back one VM per this interval without a launch that found it empty. */
  shrinkAfterMs: number;
}

/** One snapshot's pool. */
interface Pool {
  snapshot: Snapshot;
  ready: MicroVm[];
  restoring: number;
  /** How many VMs the pool aims to hold ready: `size`, grown by each launch that found it empty, up to `max`. */
  target: number;
  /** Launches waiting for the next VM the pool restores, oldest first. */
  waiting: ((vm: MicroVm | undefined) => void)[];
  lastMissAt: number;
}

/**
 * VMs restored ahead of demand. A warm VM has been restored and has served one
 * exec (under TCG a fresh process must translate every guest code path once,
 * ~200 ms), so a launch only re-keys it.
 *
 * The pool follows demand: a launch that finds it empty waits for the next
 * VM it restores (restores run `concurrency` at a time, oldest launch first,
 * rather than all at once against each other) and grows the pool by one, up
 * to `max`, so a burst or a fast run of launches is met by a pool sized for
 * it next time; once launches slow down, it shrinks back to `size`.
 */
export class WarmPool {
  private readonly pools = new Map<string, Pool>();
  /** Who waits for the end of one of a pool's restores (`fill`, `drop`). */
  private readonly restored = new Map<Pool, (() => void)[]>();
  private readonly shrinker: NodeJS.Timeout;
  private closing = false;

  constructor(
    private readonly limits: WarmPoolLimits,
    private readonly ops: WarmPoolOps,
  ) {
    this.shrinker = setInterval(() => void this.shrink(), limits.shrinkAfterMs);
    this.shrinker.unref();
  }

  /** The QEMU pids of the VMs every pool holds ready, and undefined for each restore under way: admission counts what they use. */
  pids(): (number | undefined)[] {
    const pids: (number | undefined)[] = [];
    for (const pool of this.pools.values()) {
      for (const vm of pool.ready) pids.push(vm.record.pid);
      for (let i = 0; i < pool.restoring; i++) pids.push(undefined);
    }
    return pids;
  }

  /** Starts restores until the snapshot's pool holds its target (plus the launches waiting); resolves when it does. */
  async fill(snapshot: Snapshot): Promise<void> {
    const pool = this.pool(snapshot);
    if (!pool) return;
    this.startRestores(pool);
    while (!this.closing && pool.ready.length < pool.target && pool.restoring > 0) await this.nextRestore(pool);
  }

  /**
   * Hands out a warm VM of the snapshot as `id`. With none ready, waits for
   * the next one the pool restores; undefined if the pool is off or its
   * restores fail (the caller restores directly). An unusable one is discarded.
   */
  async take(snapshot: Snapshot, id: string | undefined): Promise<MicroVm | undefined> {
    const pool = this.pool(snapshot);
    if (!pool) return undefined;
    for (;;) {
      let vm = pool.ready.shift();
      if (!vm) {
        pool.target = Math.min(this.limits.max, pool.target + 1);
        pool.lastMissAt = Date.now();
        const next = new Promise<MicroVm | undefined>((resolve) => pool.waiting.push(resolve));
        this.startRestores(pool);
        vm = await next;
        if (!vm) return undefined;
      }
      this.startRestores(pool);
      try {
        return await this.ops.handOut(vm, id);
      } catch (err) {
        this.ops.log?.(`warm VM ${vm.id} unusable (${(err as Error).message}); discarding it`);
        await this.ops.destroy(vm).catch(() => undefined);
      }
    }
  }

  /** Forgets a pooled VM whose process ended (the engine destroys it). */
  remove(vm: MicroVm): void {
    for (const pool of this.pools.values()) if (pool.ready.includes(vm)) pool.ready.splice(pool.ready.indexOf(vm), 1);
  }

  /** Ends the warm VMs of a snapshot (its image is being deleted). */
  async drop(snapshotDir: string): Promise<void> {
    const pool = this.pools.get(snapshotDir);
    if (!pool) return;
    this.pools.delete(snapshotDir);
    pool.target = 0;
    for (const resolve of pool.waiting.splice(0)) resolve(undefined);
    while (pool.restoring > 0) await this.nextRestore(pool);
    for (const vm of pool.ready.splice(0)) await this.ops.destroy(vm);
  }

  /** Stops filling and ends every warm VM. */
  async close(): Promise<void> {
    this.closing = true;
    clearInterval(this.shrinker);
    for (const dir of [...this.pools.keys()]) await this.drop(dir);
  }

  private pool(snapshot: Snapshot): Pool | undefined {
    if (this.limits.size === 0 || this.closing) return undefined;
    let pool = this.pools.get(snapshot.dir);
    if (!pool) {
      pool = { snapshot, ready: [], restoring: 0, target: this.limits.size, waiting: [], lastMissAt: 0 };
      this.pools.set(snapshot.dir, pool);
    }
    return pool;
  }

  /** Resolves when one of the pool's restores under way ends. */
  private nextRestore(pool: Pool): Promise<void> {
    return new Promise((resolve) => {
      const list = this.restored.get(pool) ?? [];
      list.push(resolve);
      this.restored.set(pool, list);
    });
  }

  private startRestores(pool: Pool): void {
    const wanted = () => pool.target + pool.waiting.length - pool.ready.length - pool.restoring;
    while (!this.closing && this.pools.get(pool.snapshot.dir) === pool && pool.restoring < this.limits.concurrency && wanted() > 0) {
      pool.restoring++;
      void this.restoreOne(pool);
    }
  }

  private async restoreOne(pool: Pool): Promise<void> {
    let vm: MicroVm | undefined;
    try {
      vm = await this.ops.restore(pool.snapshot);
      await vm.agent.exec({ command: ["true"] });
    } catch (err) {
      this.ops.log?.(`warm pool for ${pool.snapshot.dir}: ${(err as Error).message}`);
      if (vm) await this.ops.destroy(vm).catch(() => undefined);
      vm = undefined;
    }
    pool.restoring--;
    const live = vm && !this.closing && this.pools.get(pool.snapshot.dir) === pool;
    if (vm && !live) await this.ops.destroy(vm).catch(() => undefined);
    else if (vm) {
      const waiter = pool.waiting.shift();
      if (waiter) waiter(vm);
      else pool.ready.push(vm);
    } else {
      // Not retried here: the launches waiting restore directly, and the next launch tries the pool again.
      for (const resolve of pool.waiting.splice(0)) resolve(undefined);
    }
    for (const resolve of this.restored.get(pool)?.splice(0) ?? []) resolve();
    if (vm && live) this.startRestores(pool);
  }

  /** Gives back one VM of each pool grown past `size` that no launch found empty for a while. */
  private async shrink(): Promise<void> {
    for (const pool of this.pools.values()) {
      if (pool.target <= this.limits.size || Date.now() - pool.lastMissAt < this.limits.shrinkAfterMs) continue;
      pool.target--;
      const surplus = pool.ready.length > pool.target ? pool.ready.pop() : undefined;
      if (surplus) await this.ops.destroy(surplus).catch((err: Error) => this.ops.log?.(`warm pool: ${err.message}`));
    }
  }
}
