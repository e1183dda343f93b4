import { EventEmitter } from "node:events";
import { readdirSync } from "node:fs";
import { isAlive, processArgv, sleep } from "../util/process.ts";
import { hasMappedRam, restoreState, saveMappedRam, saveState, type StateLayout } from "./migration.ts";
import { QmpClient } from "./qmp.ts";
import { backingNodes, hostfwdRule, incomingStateSource, rootNode, socketPaths, startQemu, type DiskChain, type MachineSpec, type PortForward } from "./qemu.ts";

/** How long a QEMU may outlive its QMP connection (it is exiting) before it is killed as out of control. */
const QMP_LOSS_GRACE_MS = 5000;

/**
 * One running QEMU process and its QMP connection. It knows nothing of what
 * the VM is for, nor of what else it holds on the host (its jail, network):
 * `Engine` decides and releases. Emits `exit` once when the process is gone,
 * whether it was asked to quit or died.
 */
export class Machine extends EventEmitter {
  private exited = false;
  private detached = false;
  private backingBound = false;
  /** The host port forwards the process has: its start's and those added since (`addForwards`); unknown (none) for an attached one. */
  readonly forwards: PortForward[] = [];

  private constructor(
    readonly pid: number,
    /** `MachineSpec.name`: where its sockets are (`socketPaths`). */
    readonly name: string,
    private readonly qmp: QmpClient,
    /** Owner of the migration socket of a save: the jailed QEMU's uid. */
    private readonly uid: number | undefined,
    /** A disk whose chain is bound later (`DiskChain.backingLater`, `bindBacking`). */
    private readonly unboundDisk?: DiskChain,
    /** The layout of the state it restores (`MachineSpec.incomingLayout`). */
    private readonly incomingLayout: StateLayout = "stream",
  ) {
    super();
    // QEMU holds the QMP socket until it exits, so its closing is the exit signal
    // for our own processes and for adopted ones alike.
    qmp.once("close", () => void this.onQmpClosed());
  }

  /** Starts a QEMU process for `spec`; it keeps running if the server dies. */
  static async start(spec: MachineSpec): Promise<Machine> {
    const { pid, qmp } = await startQemu(spec);
    const machine = new Machine(pid, spec.name, qmp, spec.jail ? spec.uid : undefined, spec.disk.backingLater ? spec.disk : undefined, spec.incomingLayout);
    machine.forwards.push(...spec.forwards);
    return machine;
  }

  /**
   * Re-attaches to a QEMU process started earlier (by this or a previous
   * server). Undefined if `pid` is gone or is not the QEMU named `name`.
   */
  static async attach(name: string, pid: number, uid: number | undefined): Promise<Machine | undefined> {
    if (!isQemuNamed(pid, name)) return undefined;
    try {
      return new Machine(pid, name, await QmpClient.connect(socketPaths(name).qmp), uid);
    } catch {
      return undefined;
    }
  }

  /** QEMU's run state: "running", "paused", "postmigrate", "inmigrate", … */
  async runState(): Promise<string> {
    return (await this.qmp.execute<{ status: string }>("query-status")).status;
  }

  pause(): Promise<unknown> {
    return this.qmp.execute("stop");
  }

  cont(): Promise<unknown> {
    return this.qmp.execute("cont");
  }

  /**
   * Ends a migration left under way (a capture whose server died while it
   * held the guest stopped before its last pass): QEMU continues a guest it
   * stopped itself, and a later save can start. Nothing when none is.
   */
  cancelMigration(): Promise<unknown> {
    return this.qmp.execute("migrate_cancel");
  }

  /** Grows the root disk (block node `root`) to `bytes`; the guest is notified by a virtio config change. */
  resizeDisk(bytes: number): Promise<unknown> {
    return this.qmp.execute("block_resize", { "node-name": "root", size: bytes });
  }

  /** Pauses the vCPUs and writes device state (and private RAM) to `file`. */
  async save(file: string): Promise<void> {
    await this.pause();
    await saveState(this.qmp, socketPaths(this.name).migration, file, this.uid);
  }

  /**
   * Writes device state and all of RAM to `file` (not yet durable) while the
   * guest runs: its vCPUs stop only for the last pass, during which
   * `whileStopped` runs (`LiveSave`), and continue afterwards whether or not
   * the save worked. Returns how long they were stopped, from QEMU's STOP and
   * RESUME events. The capture of a running VM (vmm/capture.ts). In the
   * mapped-ram layout, `file` is one this QEMU opens itself (`saveMappedRam`).
   */
  async saveRunning(file: string, whileStopped: () => Promise<void>, layout: StateLayout = "stream"): Promise<{ pauseMs: number }> {
    const at: Partial<Record<"STOP" | "RESUME", number>> = {};
    const onEvent = (msg: { event: string; timestamp?: { seconds: number; microseconds: number } }) => {
      if ((msg.event === "STOP" || msg.event === "RESUME") && msg.timestamp) at[msg.event] = msg.timestamp.seconds * 1000 + msg.timestamp.microseconds / 1000;
    };
    this.qmp.on("event", onEvent);
    const started = performance.now();
    try {
      if (layout === "mapped-ram") await saveMappedRam(this.qmp, file, { live: { whileStopped } });
      else await saveState(this.qmp, socketPaths(this.name).migration, file, this.uid, { durable: false, live: { whileStopped } });
    } finally {
      // The guest goes on as it was whether or not the save worked.
      await this.cont();
      this.qmp.off("event", onEvent);
    }
    // Both events are QEMU's clock; without them (none seen), the whole save is the bound.
    const pauseMs = at.STOP !== undefined && at.RESUME !== undefined && at.RESUME >= at.STOP ? at.RESUME - at.STOP : performance.now() - started;
    return { pauseMs };
  }

  /** Whether this process can write a state in the mapped-ram layout (`StateLayout`). */
  hasMappedRam(): Promise<boolean> {
    return hasMappedRam(this.qmp);
  }

  /**
   * Forwards host loopback ports to the guest through its user-mode netdev
   * (`net0`), as `MachineSpec.forwards` does at start: the ports of a
   * process started before it knew them (a pre-started one, engine.ts).
   */
  async addForwards(forwards: PortForward[]): Promise<void> {
    for (const f of forwards) {
      // An HMP command (QEMU has no QMP one): it answers an error as text, success as nothing.
      const answer = await this.qmp.execute<string>("human-monitor-command", { "command-line": `hostfwd_add net0 ${hostfwdRule(f)}` });
      if (answer.trim()) throw new Error(`forwarding host port ${f.hostPort} to guest port ${f.guestPort}: ${answer.trim()}`);
      this.forwards.push(f);
    }
  }

  /** Whether its disk still waits for its backing chain (`bindBacking`). */
  get backingUnbound(): boolean {
    return this.unboundDisk !== undefined && !this.backingBound;
  }

  /**
   * Opens the backing chain of a disk started without it (`DiskChain.backingLater`)
   * and puts it under the disk (`blockdev-reopen` with a `backing`), before the
   * restore: the chain's files, mounted in the jail from the start, are complete
   * only now. The chain is the spec's, never the disk's header.
   */
  async bindBacking(): Promise<void> {
    const disk = this.unboundDisk;
    if (!disk || this.backingBound) throw new Error(`${this.name}'s disk has its backing chain already`);
    for (const node of backingNodes(disk)) await this.qmp.execute("blockdev-add", node);
    await this.qmp.execute("blockdev-reopen", { options: [rootNode(disk)] });
    this.backingBound = true;
  }

  /** Loads the state the machine was started with (`incomingState`); still paused afterwards. */
  restore(): Promise<void> {
    return restoreState(this.qmp, incomingStateSource(), this.incomingLayout);
  }

  /** Ends the process (QMP quit, then SIGKILL if it lingers) and waits until it is gone. */
  async stop(graceMs = 2000): Promise<void> {
    if (!this.exited) await this.qmp.execute("quit").catch(() => undefined);
    const deadline = Date.now() + graceMs;
    while (isAlive(this.pid) && Date.now() < deadline) await sleep(5);
    await killAndWait(this.pid);
    this.qmp.close();
  }

  /** Closes the QMP connection and leaves the process running (for another server to adopt). */
  detach(): void {
    this.detached = true;
    this.qmp.close();
  }

  /**
   * QMP closes when QEMU exits; a QEMU that closed it (or broke the protocol,
   * which closes it from our side) and lives on can no longer be controlled,
   * so after a grace period it is killed: either way the machine is gone.
   */
  private async onQmpClosed(): Promise<void> {
    if (this.detached) return;
    const deadline = Date.now() + QMP_LOSS_GRACE_MS;
    while (isAlive(this.pid) && Date.now() < deadline) await sleep(20);
    if (isAlive(this.pid)) await killAndWait(this.pid);
    this.exited = true;
    this.emit("exit");
  }
}

/**
 * Whether `pid` is (still) the QEMU process named `name`: a recorded pid may
 * since belong to another process. The jail's `unshare`, which carries the
 * same arguments, is not: it exits (and reaps QEMU) when QEMU is gone.
 */
export function isQemuNamed(pid: number, name: string): boolean {
  const argv = pid > 0 && isAlive(pid) ? processArgv(pid) : undefined;
  return (argv?.[0]?.endsWith("qemu-system-x86_64") ?? false) && argv!.includes(`${name},process=cocoon-${name}`);
}

/**
 * Kills every QEMU process named `name` and waits until they are gone: `pid`
 * if it is still that QEMU, else any such process found in /proc (a process
 * whose pid was never recorded: the server died while it started).
 */
export async function killQemuNamed(name: string, pid?: number): Promise<void> {
  const pids = pid && isQemuNamed(pid, name) ? [pid] : readdirSync("/proc").filter((n) => /^\d+$/.test(n)).map(Number).filter((p) => isQemuNamed(p, name));
  for (const p of pids) await killAndWait(p);
}

async function killAndWait(pid: number): Promise<void> {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // already gone
  }
  while (isAlive(pid)) await sleep(5);
}
