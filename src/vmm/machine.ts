import { EventEmitter } from "node:events";
import { isAlive, processArgv, sleep } from "../util/process.ts";
import { restoreState, saveState } from "./migration.ts";
import { QmpClient } from "./qmp.ts";
import { machinePaths, startQemu, type MachineSpec } from "./qemu.ts";

/**
 * One running QEMU process and its QMP connection. It knows nothing of what
 * the VM is for; `Engine` decides. Emits `exit` once when the process is gone,
 * whether it was asked to quit or died.
 */
export class Machine extends EventEmitter {
  private exited = false;
  private detached = false;

  private constructor(
    readonly pid: number,
    readonly vmDir: string,
    private readonly qmp: QmpClient,
  ) {
    super();
    // QEMU holds the QMP socket until it exits, so its closing is the exit signal
    // for our own processes and for adopted ones alike.
    qmp.once("close", () => void this.onQmpClosed());
  }

  /** Starts a QEMU process for `spec`; it keeps running if the server dies. */
  static async start(spec: MachineSpec): Promise<Machine> {
    const pid = await startQemu(spec);
    try {
      return new Machine(pid, spec.vmDir, await QmpClient.connect(machinePaths(spec.vmDir).qmp));
    } catch (err) {
      killProcess(pid);
      throw err;
    }
  }

  /**
   * Re-attaches to a QEMU process started earlier (by this or a previous server).
   * Returns undefined if `pid` is gone or is not the QEMU of `vmDir`.
   */
  static async attach(vmDir: string, pid: number): Promise<Machine | undefined> {
    const qmpPath = machinePaths(vmDir).qmp;
    const argv = processArgv(pid);
    if (!argv || !isAlive(pid) || !argv.some((a) => a.includes(qmpPath))) return undefined;
    try {
      return new Machine(pid, vmDir, await QmpClient.connect(qmpPath));
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

  /** Pauses the vCPUs and writes device state (and private RAM) to `file`. */
  async save(file: string): Promise<void> {
    await this.pause();
    await saveState(this.qmp, machinePaths(this.vmDir).migration, file);
  }

  /** Loads `file` into a machine started with `incoming: true`; still paused afterwards. */
  restore(file: string): Promise<void> {
    return restoreState(this.qmp, machinePaths(this.vmDir).migration, file);
  }

  /** Ends the process (QMP quit, then SIGKILL if it lingers) and waits until it is gone. */
  async stop(graceMs = 2000): Promise<void> {
    if (!this.exited) await this.qmp.execute("quit").catch(() => undefined);
    const deadline = Date.now() + graceMs;
    while (isAlive(this.pid) && Date.now() < deadline) await sleep(5);
    if (isAlive(this.pid)) killProcess(this.pid);
    while (isAlive(this.pid)) await sleep(5);
    this.qmp.close();
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
    this.emit("exit");
  }
}

function killProcess(pid: number): void {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // already gone
  }
}
