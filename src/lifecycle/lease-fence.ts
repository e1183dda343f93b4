import { spawn } from "node:child_process";
import { closeSync, openSync, readFileSync } from "node:fs";
import { chmod, mkdir, readFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { writeFileAtomic } from "../util/files.ts";
import { isAlive, processArgv, sleep } from "../util/process.ts";
import { REPO_ROOT } from "../util/repo-root.ts";
import { Cgroups, detectCgroups } from "../vmm/jail/index.ts";

/**
 * The lease fence (docs/cluster.md): a small process beside each node's
 * server that SIGKILLs every QEMU of the node once the node's lease may have
 * expired, so that a node killed (`kill -9`), frozen (`SIGSTOP`) or cut off
 * from PostgreSQL has no guest left running by the time its peers see its
 * lease expired. Its peers may then act on its VMs (fail them, or restore
 * them elsewhere) knowing nothing of them runs on it.
 *
 * The server, after each registration or renewal that took, writes a
 * deadline on CLOCK_MONOTONIC: the time taken before the UPDATE was sent,
 * plus the lease, minus a margin. The database set the lease from its own
 * `now()`, which is no earlier than that send, so the fence's deadline
 * passes at least `FENCE_MARGIN_SECONDS` before the database's expiry. The
 * fence reads it every FENCE_CHECK_MS; past it, it kills every process in
 * the node's VM cgroups (the jail's, whatever their command lines) and
 * keeps killing until a deadline in the future appears.
 *
 * The fence is started detached, outlives the server (a server restarted
 * within its lease finds it and its VMs run on) and is one per data
 * directory (its pid file, checked against /proc/<pid>/cmdline).
 */

/** What the server orders its fence (the `deadline` file, JSON). */
export interface FenceOrder {
  /** The boot the deadline belongs to (/proc/sys/kernel/random/boot_id): CLOCK_MONOTONIC starts again at each boot. */
  bootId: string;
  /** CLOCK_MONOTONIC nanoseconds (`process.hrtime.bigint()`), decimal: past it, no QEMU of the node may run. */
  deadlineNs: string;
  /** The server stopped gracefully: end what is left of its QEMUs and exit. */
  stop?: boolean;
}

/** Covers the fence's check period, the kills themselves, and clock-rate differences between the node and the database. */
export const FENCE_MARGIN_SECONDS = 3;
export const FENCE_CHECK_MS = 250;

/** The deadline of a lease of `leaseSeconds` whose write was sent at `sentAtNs` (CLOCK_MONOTONIC). */
export function leaseDeadlineNs(sentAtNs: bigint, leaseSeconds: number, marginSeconds = FENCE_MARGIN_SECONDS): bigint {
  return sentAtNs + BigInt(Math.round((leaseSeconds - marginSeconds) * 1e9));
}

/**
 * What the fence does on reading `order` (untrusted JSON: anything it cannot
 * read is no deadline) at `now`: `hold` while the deadline is ahead, `kill`
 * past it, with none, or with one of another boot; `exit` on a stop order.
 */
export function fenceAction(order: unknown, now: { bootId: string; ns: bigint }): "hold" | "kill" | "exit" {
  const o = order as Partial<FenceOrder> | null | undefined;
  if (!o || typeof o !== "object") return "kill";
  if (o.stop === true) return "exit";
  if (o.bootId !== now.bootId || typeof o.deadlineNs !== "string" || !/^\d{1,30}$/.test(o.deadlineNs)) return "kill";
  return now.ns < BigInt(o.deadlineNs) ? "hold" : "kill";
}

const CLI_BIN = join(REPO_ROOT, "packages/cli/bin/cocoon.js");

const fencePaths = (dataDir: string) => {
  const dir = join(dataDir, "lease-fence");
  return { dir, pid: join(dir, "fence.pid"), order: join(dir, "deadline"), log: join(dir, "fence.log") };
};

function bootId(): string {
  return readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
}

/** The pid of the live fence guarding `dataDir`, per its pid file and that process's command line. */
function runningFence(dataDir: string): number | undefined {
  const pid = Number(readFileSync(fencePaths(dataDir).pid, "utf8").trim());
  if (!Number.isSafeInteger(pid) || pid <= 0 || !isAlive(pid)) return undefined;
  const argv = processArgv(pid) ?? [];
  const at = argv.indexOf("--data-dir");
  return argv.includes("lease-fence") && at >= 0 && argv[at + 1] === dataDir ? pid : undefined;
}

const runningFenceOrNone = (dataDir: string) => {
  try {
    return runningFence(dataDir);
  } catch {
    return undefined; // no pid file
  }
};

/** The server's side: starts or finds the node's fence and writes its deadlines (ClusterNode's LeaseGuard). */
export class LeaseFence {
  private readonly dataDir: string;

  constructor(private readonly opts: { dataDir: string; cgroupParent: string; log: (line: string) => void }) {
    this.dataDir = resolve(opts.dataDir);
  }

  /** The lease holds `leaseSeconds` past `sentAtNs` (CLOCK_MONOTONIC, taken before the renewal was sent). */
  async renewed(sentAtNs: bigint, leaseSeconds: number): Promise<void> {
    await this.order({ bootId: bootId(), deadlineNs: String(leaseDeadlineNs(sentAtNs, leaseSeconds)) });
  }

  /** The fence runs: the one already running for this data directory, else a new one. Throws when none can be started. */
  async ensure(): Promise<void> {
    if (runningFenceOrNone(this.dataDir) !== undefined) return;
    const paths = await this.prepare();
    const logFd = openSync(paths.log, "a", 0o600);
    try {
      const child = spawn(process.execPath, [CLI_BIN, "lease-fence", "--data-dir", this.dataDir, "--cgroup-parent", this.opts.cgroupParent], {
        detached: true,
        stdio: ["ignore", logFd, logFd],
      });
      child.unref();
      // Started once it has claimed the pid file.
      for (let waited = 0; waited < 10_000 && child.exitCode === null; waited += 25) {
        if (runningFenceOrNone(this.dataDir) === child.pid) {
          this.opts.log(`cluster: lease fence started (pid ${child.pid}); it ends this node's QEMUs ${FENCE_MARGIN_SECONDS} s before its lease expires`);
          return;
        }
        await sleep(25);
      }
      child.kill("SIGKILL");
      throw new Error(`the lease fence did not start (its log: ${paths.log})`);
    } finally {
      closeSync(logFd);
    }
  }

  /** A graceful stop: the fence ends whatever QEMU is left (the node's VMs are suspended or failed by now) and exits. */
  async release(): Promise<void> {
    await this.order({ bootId: bootId(), deadlineNs: "0", stop: true });
  }

  private async order(order: FenceOrder): Promise<void> {
    // Whole or not at all: the fence never reads half an order. Not synced: a deadline means nothing after a reboot.
    await writeFileAtomic((await this.prepare()).order, JSON.stringify(order), 0o600, { durable: false });
  }

  private async prepare(): Promise<ReturnType<typeof fencePaths>> {
    const paths = fencePaths(this.dataDir);
    // Root's alone: whoever writes the deadline keeps the node's guests alive.
    await mkdir(paths.dir, { recursive: true, mode: 0o700 });
    await chmod(paths.dir, 0o700);
    return paths;
  }
}

/** `cocoon lease-fence --data-dir D --cgroup-parent P`: the fence's process (started by LeaseFence.ensure). */
export async function runLeaseFence(opts: { dataDir: string; cgroupParent: string }): Promise<void> {
  const dataDir = resolve(opts.dataDir);
  const paths = fencePaths(dataDir);
  const log = (line: string) => process.stderr.write(`${new Date().toISOString()} [lease-fence ${process.pid}] ${line}\n`);
  const other = runningFenceOrNone(dataDir);
  if (other !== undefined && other !== process.pid) {
    log(`fence ${other} already guards ${dataDir}: exiting`);
    process.exit(0);
  }
  await writeFileAtomic(paths.pid, `${process.pid}\n`, 0o600, { durable: false });
  const cgroups = new Cgroups(detectCgroups(), opts.cgroupParent);
  const boot = bootId();
  log(`guarding ${dataDir} (cgroups under ${opts.cgroupParent})`);
  let last: "hold" | "kill" | "exit" | undefined;
  for (;;) {
    // Another fence took over, or the data directory is gone: this one is done.
    if (runningFenceOrNone(dataDir) !== process.pid) {
      log("no longer this data directory's fence: exiting");
      process.exit(0);
    }
    const order: unknown = await readFile(paths.order, "utf8").then((t) => JSON.parse(t) as unknown, () => undefined);
    const action = fenceAction(order, { bootId: boot, ns: process.hrtime.bigint() });
    if (action === "hold") {
      if (last === "kill") log("a new deadline: holding");
    } else {
      if (last !== action) log(action === "exit" ? "the server stopped: ending what is left" : "the lease deadline passed: ending every QEMU of the node");
      const killed = await cgroups.killAll();
      if (killed.length > 0) log(`killed ${killed.join(", ")}`);
      if (action === "exit") process.exit(0);
    }
    last = action;
    await sleep(FENCE_CHECK_MS);
  }
}
