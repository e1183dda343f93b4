import type { Snapshot } from "./snapshot.ts";
import type { MicroVm } from "./vm.ts";

/** What the pool needs of the engine. */
export interface PrestartOps {
  /**
   * Starts a QEMU process for a clone of the snapshot and leaves it waiting
   * for its incoming restore: directory, uid, disk overlay, jail, process,
   * QMP. Recorded `pooled` before anything starts, so a restart discards it.
   */
  start(snapshot: Snapshot): Promise<MicroVm>;
  /** Ends it and everything it holds (its release stacks). */
  release(vm: MicroVm): Promise<void>;
  log?: (msg: string) => void;
}

/** One pre-started process, or one being started (`vm` absent), oldest first. */
interface Entry {
  key: string;
  snapshot: Snapshot;
  vm?: MicroVm;
}

/**
 * Which snapshot a process was started for: its directory and when it was
 * made (a rebuilt snapshot in the same directory is another one). The
 * snapshot fixes everything a process binds when it starts: vCPUs, memory
 * (its memory file is mapped then), devices, disk chain, the state it will
 * read and the QEMU build that may read it.
 */
export const snapshotKey = (snapshot: Snapshot) => `${snapshot.dir}@${snapshot.manifest.createdAt}`;

/**
 * QEMU processes started ahead of launches, jailed and waiting for an
 * incoming restore (`-incoming defer`), so a launch that finds one skips
 * the directory, overlay, jail and spawn phases and only binds its port
 * forwards and restores. Unlike a warm VM (`WarmPool`) nothing of the guest
 * runs: a pre-started process uses no CPU while it waits, and what it holds
 * is QEMU's own memory, not the guest's.
 *
 * `capacity` processes at most, for all snapshots together (0: off). The
 * pool follows launches: each launch that could use one (`take`) is followed
 * by a start for its snapshot (`replenish`), which makes room, when the pool
 * is full, by ending the oldest process of another snapshot. A run of
 * launches faster than a start grows the snapshot's share up to `capacity`.
 */
export class PrestartPool {
  private readonly entries: Entry[] = [];
  /** Starts and releases under way: `close` waits for them. */
  private readonly pending = new Set<Promise<void>>();
  private closing = false;

  constructor(
    private readonly capacity: number,
    private readonly ops: PrestartOps,
  ) {}

  /** A pre-started process of the snapshot, oldest first, now the caller's; undefined if there is none ready. */
  take(snapshot: Snapshot): MicroVm | undefined {
    const key = snapshotKey(snapshot);
    const at = this.entries.findIndex((e) => e.key === key && e.vm);
    return at < 0 ? undefined : this.entries.splice(at, 1)[0]!.vm;
  }

  /** Starts one process for the snapshot if there is room or room can be made (see the class). */
  replenish(snapshot: Snapshot): void {
    if (this.capacity === 0 || this.closing) return;
    const key = snapshotKey(snapshot);
    if (this.entries.length >= this.capacity) {
      const other = this.entries.findIndex((e) => e.key !== key && e.vm);
      if (other < 0) return;
      const [evicted] = this.entries.splice(other, 1);
      void this.release(evicted!.vm!);
    }
    const entry: Entry = { key, snapshot };
    this.entries.push(entry);
    void this.track(
      this.ops.start(snapshot).then(
        (vm) => {
          if (this.closing || !this.entries.includes(entry)) void this.release(vm);
          else entry.vm = vm;
        },
        (err: Error) => {
          this.ops.log?.(`pre-starting a QEMU process for ${snapshot.dir}: ${err.message}`);
          this.forget(entry);
        },
      ),
    );
  }

  /** Forgets a process that ended by itself (the engine releases it); whether it was the pool's. */
  remove(vm: MicroVm): boolean {
    const at = this.entries.findIndex((e) => e.vm === vm);
    if (at >= 0) this.entries.splice(at, 1);
    return at >= 0;
  }

  /** The pre-started processes' QEMU pids, undefined for each start under way: admission counts what they hold. */
  pids(): (number | undefined)[] {
    return this.entries.map((e) => e.vm?.record.pid);
  }

  /** Ends the processes of a snapshot directory (its image is being deleted); starts under way end when they are done. */
  async drop(snapshotDir: string): Promise<void> {
    const dropped = this.entries.filter((e) => e.snapshot.dir === snapshotDir);
    for (const entry of dropped) this.forget(entry);
    await Promise.all(dropped.flatMap((e) => (e.vm ? [this.release(e.vm)] : [])));
  }

  /** Stops starting and ends every pre-started process, waiting for the starts under way (server shutdown). */
  async close(): Promise<void> {
    this.closing = true;
    for (const entry of this.entries.splice(0)) if (entry.vm) void this.release(entry.vm);
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }

  private forget(entry: Entry): void {
    const at = this.entries.indexOf(entry);
    if (at >= 0) this.entries.splice(at, 1);
  }

  private release(vm: MicroVm): Promise<void> {
    return this.track(this.ops.release(vm).catch((err: Error) => this.ops.log?.(`releasing pre-started process ${vm.record.processName}: ${err.message}`)));
  }

  private track(work: Promise<void>): Promise<void> {
    const tracked = work.finally(() => this.pending.delete(tracked));
    this.pending.add(tracked);
    return tracked;
  }
}
