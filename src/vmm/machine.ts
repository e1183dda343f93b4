import { EventEmitter } from "node:events";
import { readFile } from "node:fs/promises";
import { isAlive, processArgv, sleep } from "../util/process.ts";
import { restoreState, saveState } from "./migration.ts";
import { QmpClient } from "./qmp.ts";
import { INCOMING_STATE_FD, machinePaths, startQemu, type MachineSpec } from "./qemu.ts";

/** Host-side cleanup once the process is gone (its jail's cgroup and files). */
type Release = () => Promise<void>;

/**
 * One running QEMU process and its QMP connection. It knows nothing of what
 * the VM is for; `Engine` decides. Emits `exit` once when the process is gone,
 * whether it was asked to quit or died.
 */
export class Machine extends EventEmitter {
  private exited = false;
  private detached = false;
  /** Once: both `stop` and the exit watcher release, and a later process of the same VM may own a jail of the same name. */
  private released: Promise<void> | undefined;

  private constructor(
    readonly pid: number,
    readonly vmDir: string,
    private readonly qmp: QmpClient,
    private readonly release: Release,
  ) {
    super();
    // QEMU holds the QMP socket until it exits, so its closing is the exit signal
    // for our own processes and for adopted ones alike.
    qmp.once("close", () => void this.onQmpClosed());
  }

  /** Starts a QEMU process for `spec`; it keeps running if the server dies. */
  static async start(spec: MachineSpec): Promise<Machine> {
    const release: Release = () => spec.jail?.release() ?? Promise.resolve();
    try {
      const { pid, qmp } = await startQemu(spec);
      return new Machine(pid, spec.vmDir, qmp, release);
    } catch (err) {
      // A QEMU that never answered: its jail (PID 1 gone) takes the process with it.
      await killRecordedQemu(spec.jail?.pidfile ?? machinePaths(spec.vmDir).pidfile, spec.vmDir);
      await release();
      throw err;
    }
  }

  /**
   * Re-attaches to a QEMU process started earlier (by this or a previous server).
   * Returns undefined if `pid` is gone or is not the QEMU of `vmDir`.
   */
  static async attach(vmDir: string, pid: number, release: Release): Promise<Machine | undefined> {
    if (!isQemuOf(pid, vmDir)) return undefined;
    try {
      return new Machine(pid, vmDir, await QmpClient.connect(machinePaths(vmDir).qmp), release);
    } catch {
      return undefined;
    }
  }

  get isRunning(): boolean {
    return !this.exited;
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

  /** Grows the root disk (`-drive id=root`) to `bytes`; the guest is notified by a virtio config change. */
  resizeDisk(bytes: number): Promise<unknown> {
    return this.qmp.execute("block_resize", { device: "root", size: bytes });
  }

  /** Pauses the vCPUs and writes device state (and private RAM) to `file`. */
  async save(file: string): Promise<void> {
    await this.pause();
    await saveState(this.qmp, machinePaths(this.vmDir).migration, file);
  }

  /** Loads the state the machine was started with (`incomingState`); still paused afterwards. */
  restore(): Promise<void> {
    return restoreState(this.qmp, INCOMING_STATE_FD);
  }

  /** Ends the process (QMP quit, then SIGKILL if it lingers), waits until it is gone and releases its jail. */
  async stop(graceMs = 2000): Promise<void> {
    if (!this.exited) await this.qmp.execute("quit").catch(() => undefined);
    const deadline = Date.now() + graceMs;
    while (isAlive(this.pid) && Date.now() < deadline) await sleep(5);
    if (isAlive(this.pid)) killProcess(this.pid);
    while (isAlive(this.pid)) await sleep(5);
    this.qmp.close();
    await (this.released ??= this.release());
  }

  /** Closes the QMP connection and leaves the process running (for another server to adopt). */
  detach(): void {
    this.detached = true;
    this.qmp.close();
  }

  private async onQmpClosed(): Promise<void> {
    if (this.detached) return;
    while (isAlive(this.pid)) await sleep(20);
    this.exited = true;
    await (this.released ??= this.release()).catch(() => undefined);
    this.emit("exit");
  }
}

/** Whether `pid` is (still) the QEMU of `vmDir`: a recorded pid may since belong to another process. */
function isQemuOf(pid: number, vmDir: string): boolean {
  const qmpPath = machinePaths(vmDir).qmp;
  return pid > 0 && isAlive(pid) && (processArgv(pid)?.some((a) => a.includes(qmpPath)) ?? false);
}

/**
 * Kills the QEMU of `vmDir` whose pid `pidfile` recorded, if that pid is still
 * it, and waits until it is gone. A missing pidfile means nothing to kill.
 */
export async function killRecordedQemu(pidfile: string, vmDir: string): Promise<void> {
  const pid = Number(await readFile(pidfile, "utf8").catch(() => "0"));
  if (!isQemuOf(pid, vmDir)) return;
  killProcess(pid);
  while (isAlive(pid)) await sleep(5);
}

function killProcess(pid: number): void {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // already gone
  }
}
