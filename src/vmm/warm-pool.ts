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

/**
 * VMs restored ahead of demand, `size` per snapshot. A warm VM has been
 * restored and has served one exec (under TCG a fresh process must translate
 * every guest code path once, ~200 ms), so a launch only re-keys it.
 */
export class WarmPool {
  private readonly pools = new Map<string, MicroVm[]>();
  private readonly filling = new Map<string, Promise<void>>();
  private closing = false;

  constructor(
    private readonly size: number,
    private readonly ops: WarmPoolOps,
  ) {}

  /** Fills the snapshot's pool up to `size`; resolves when it is full (or the pool closes). One fill runs per snapshot at a time. */
  fill(snapshot: Snapshot): Promise<void> {
    const running = this.filling.get(snapshot.dir);
    if (running || this.size === 0 || this.closing) return running ?? Promise.resolve();
    const pool = this.pools.get(snapshot.dir) ?? [];
    this.pools.set(snapshot.dir, pool);
    const fill = (async () => {
      try {
        while (pool.length < this.size && !this.closing) {
          const vm = await this.ops.restore(snapshot);
          if (this.closing) {
            await this.ops.destroy(vm);
            break;
          }
          await vm.agent.exec({ command: ["true"] });
          pool.push(vm);
        }
      } catch (err) {
        this.ops.log?.(`warm pool for ${snapshot.dir}: ${(err as Error).message}`);
      }
    })().finally(() => this.filling.delete(snapshot.dir)); // a microtask: runs after the set below
    this.filling.set(snapshot.dir, fill);
    return fill;
  }

  /** Hands out a warm VM of the snapshot as `id`; undefined if none is ready. An unusable one is discarded. */
  async take(snapshot: Snapshot, id: string | undefined): Promise<MicroVm | undefined> {
    const pool = this.pools.get(snapshot.dir) ?? [];
    for (let vm = pool.shift(); vm; vm = pool.shift()) {
      try {
        return await this.ops.handOut(vm, id);
      } catch (err) {
        this.ops.log?.(`warm VM ${vm.id} unusable (${(err as Error).message}); discarding it`);
        await this.ops.destroy(vm).catch(() => undefined);
      }
    }
    return undefined;
  }

  /** Forgets a pooled VM whose process ended (the engine destroys it). */
  remove(vm: MicroVm): void {
    for (const pool of this.pools.values()) if (pool.includes(vm)) pool.splice(pool.indexOf(vm), 1);
  }

  /** Ends the warm VMs of a snapshot (its image is being deleted). */
  async drop(snapshotDir: string): Promise<void> {
    await this.filling.get(snapshotDir);
    for (const vm of this.pools.get(snapshotDir)?.splice(0) ?? []) await this.ops.destroy(vm);
    this.pools.delete(snapshotDir);
  }

  /** Stops filling and ends every warm VM. */
  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.filling.values());
    for (const dir of [...this.pools.keys()]) await this.drop(dir);
  }
}
