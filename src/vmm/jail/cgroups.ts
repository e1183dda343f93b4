import { readFileSync } from "node:fs";
import { access, mkdir, readdir, readFile, rmdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { sleep } from "../../util/process.ts";

/** Controllers a VM's cgroup uses: CPU time, memory, and tasks (QEMU's threads). */
const CONTROLLERS = ["cpu", "memory", "pids"] as const;
type Controller = (typeof CONTROLLERS)[number];

/** Where each controller lives: hosts run cgroup v2, v1, or a hybrid (v1 controllers beside a v2 mount). */
export interface CgroupLayout {
  version: 1 | 2;
  /** Mount point of the hierarchy holding each controller. */
  mounts: Record<Controller, string>;
}

export interface CgroupLimits {
  /** CPU time per period, in CPUs (the VM's vCPUs). */
  cpus: number;
  memoryBytes: number;
  /** Tasks (QEMU threads: vCPUs, I/O workers, RCU…). */
  pids: number;
  /** Share of CPU under contention, relative to other VMs (cgroup v2 cpu.weight, 1–10000; v1 cpu.shares is 10.24×). */
  cpuWeight: number;
}

/** What a VM's cgroup currently holds and has enforced, read back from the kernel. */
export interface CgroupReading {
  limits: CgroupLimits;
  memoryBytes: number;
  /** Periods in which the group was runnable under its CPU quota (bandwidth control at work). */
  cpuPeriods: number;
  /** Periods in which the CPU quota stopped the group. */
  cpuThrottled: number;
  /** Processes the cgroup's own OOM killer has killed (its memory limit at work). */
  oomKills: number;
}

const CPU_PERIOD_US = 100_000;

/** One reading of the VMs' parent cgroup's memory. */
export interface ParentMemoryReading {
  /** When it was read (ms). */
  at: number;
  usageBytes: number;
  limitBytes: number;
  /** How often a charge has hit the limit so far (v2 memory.events max, v1 memory.failcnt). */
  limitHits: number;
  /**
   * Time tasks were stalled on memory so far, in µs: on v2 the parent's PSI
   * "full" (all its tasks); on v1, which has none per cgroup, the host's
   * "some" (the host's "full" needs every task on it stalled, the server's too).
   */
  stallUs: number;
  /** Page cache charged to the VMs (v2 memory.stat file, v1 total_cache): what reclaim can free without killing. */
  fileBytes: number;
  /** Of it, the pages QEMUs map (v2 file_mapped, v1 total_mapped_file): snapshots' memory files and the like, shared among VMs. */
  mappedFileBytes: number;
}

/** Readings the guard needs in a row (one a second) before it acts. */
export const GUARD_READINGS = 4;

/**
 * Whether all VMs together are stuck at their cap: every reading of the
 * last GUARD_READINGS within 2 % of the limit, the limit hit again between
 * each, and either tasks stalled on memory for at least half that time or
 * the cap holding almost nothing reclaim can free (page cache under 5 % of
 * it). The kernel's OOM killer acts only once reclaim makes no progress,
 * and VMs whose guest RAM and QEMU binaries are file pages (reclaimed, read
 * back, reclaimed) make just enough to escape it for minutes, all of them
 * crawling; this is the sign of it. The second arm matters on cgroup v1,
 * where the stall can only be read host-wide: one VM crawling at a cap full
 * of its neighbours' allocations stalls too little of the host to show
 * (a hog held at 125 of its 200 MiB for 150 s). A cap full of page cache
 * that reclaim frees without stalls is not stuck.
 */
export function stuckAtCap(readings: ParentMemoryReading[]): boolean {
  if (readings.length < GUARD_READINGS) return false;
  const last = readings.slice(-GUARD_READINGS);
  const first = last[0]!;
  const end = last.at(-1)!;
  const stalledShare = (end.stallUs - first.stallUs) / 1000 / Math.max(1, end.at - first.at);
  const nothingToReclaim = last.every((r) => r.fileBytes < r.limitBytes * 0.05);
  return (stalledShare >= 0.5 || nothingToReclaim) && last.every((r, i) => r.usageBytes >= r.limitBytes * 0.98 && (i === 0 || r.limitHits > last[i - 1]!.limitHits));
}

/**
 * Finds the cgroup hierarchy of each controller from /proc/self/mountinfo: a
 * controller enabled in the v2 hierarchy is used there, else its v1 mount.
 * Both versions use one layout: `<mount>/<parent>/<name>` per VM.
 */
export function detectCgroups(mountinfo = readFileSync("/proc/self/mountinfo", "utf8")): CgroupLayout {
  const v1 = new Map<string, string>();
  let v2: string | undefined;
  for (const line of mountinfo.split("\n")) {
    const [mount, rest] = line.split(" - ");
    if (!mount || !rest) continue;
    const mountPoint = mount.split(" ")[4]!;
    const [fstype, , superOptions = ""] = rest.split(" ");
    if (fstype === "cgroup2") v2 ??= mountPoint;
    if (fstype === "cgroup") for (const opt of superOptions.split(",")) v1.set(opt, mountPoint);
  }
  const v2Controllers = v2 ? readFileSync(join(v2, "cgroup.controllers"), "utf8").trim().split(/\s+/) : [];
  if (v2 && CONTROLLERS.every((c) => v2Controllers.includes(c))) {
    return { version: 2, mounts: { cpu: v2, memory: v2, pids: v2 } };
  }
  const missing = CONTROLLERS.filter((c) => !v1.has(c));
  if (missing.length) {
    throw new Error(`cgroup controllers ${missing.join(", ")} are not mounted (neither cgroup v2 nor v1): the QEMU jail needs them`);
  }
  return { version: 1, mounts: { cpu: v1.get("cpu")!, memory: v1.get("memory")!, pids: v1.get("pids")! } };
}

/** One cgroup per VM under `<parent>`, in every hierarchy that holds one of its controllers. */
export class Cgroups {
  constructor(
    readonly layout: CgroupLayout,
    private readonly parent: string,
    /** Memory all VMs under `parent` may use together (its limit); undefined: none. */
    private readonly parentMemoryBytes?: number,
  ) {}

  /** The VM's directories, one per hierarchy (v1 may mount controllers together). */
  dirs(name: string): string[] {
    return [...new Set(Object.values(this.layout.mounts))].map((m) => join(m, this.parent, name));
  }

  private dir(controller: Controller, name: string): string {
    return join(this.layout.mounts[controller], this.parent, name);
  }

  /** Creates the VM's cgroup with its limits; returns the `cgroup.procs` files a process writes to join it. */
  async create(name: string, limits: CgroupLimits): Promise<string[]> {
    if (this.layout.version === 2) await this.enableV2Controllers();
    for (const dir of this.dirs(name)) await mkdir(dir, { recursive: true });
    await this.limitParent();
    const quota = Math.round(limits.cpus * CPU_PERIOD_US);
    if (this.layout.version === 2) {
      const dir = this.dir("cpu", name);
      await writeFile(join(dir, "cpu.max"), `${quota} ${CPU_PERIOD_US}`);
      await writeOptional(join(dir, "cpu.max.burst"), String(quota));
      await this.setCpuWeight(name, limits.cpuWeight);
      await writeFile(join(dir, "memory.max"), String(limits.memoryBytes));
      // Guest RAM pushed to swap would escape the limit in all but name.
      await writeOptional(join(dir, "memory.swap.max"), "0");
      await writeFile(join(dir, "pids.max"), String(limits.pids));
    } else {
      await writeFile(join(this.dir("cpu", name), "cpu.cfs_period_us"), String(CPU_PERIOD_US));
      await writeFile(join(this.dir("cpu", name), "cpu.cfs_quota_us"), String(quota));
      await writeOptional(join(this.dir("cpu", name), "cpu.cfs_burst_us"), String(quota));
      await this.setCpuWeight(name, limits.cpuWeight);
      await writeFile(join(this.dir("memory", name), "memory.limit_in_bytes"), String(limits.memoryBytes));
      await writeOptional(join(this.dir("memory", name), "memory.memsw.limit_in_bytes"), String(limits.memoryBytes));
      await writeFile(join(this.dir("pids", name), "pids.max"), String(limits.pids));
    }
    return this.dirs(name).map((d) => join(d, "cgroup.procs"));
  }

  /** Sets the VM's share of CPU under contention (`CgroupLimits.cpuWeight`). */
  async setCpuWeight(name: string, weight: number): Promise<void> {
    if (this.layout.version === 2) await writeFile(join(this.dir("cpu", name), "cpu.weight"), String(weight));
    else await writeFile(join(this.dir("cpu", name), "cpu.shares"), String(Math.round(weight * 10.24)));
  }

  /** Reads the VM's limits and counters back from the kernel. */
  async read(name: string): Promise<CgroupReading> {
    const text = (controller: Controller, file: string) => readFile(join(this.dir(controller, name), file), "utf8");
    const field = (content: string, key: string) => Number(new RegExp(`^${key} (\\d+)`, "m").exec(content)?.[1] ?? 0);
    const cpuStat = await text("cpu", "cpu.stat");
    const pids = Number(await text("pids", "pids.max"));
    if (this.layout.version === 2) {
      const [quota, period] = (await text("cpu", "cpu.max")).trim().split(" ").map(Number);
      return {
        limits: { cpus: quota! / period!, memoryBytes: Number(await text("memory", "memory.max")), pids, cpuWeight: Number(await text("cpu", "cpu.weight")) },
        memoryBytes: Number(await text("memory", "memory.current")),
        cpuPeriods: field(cpuStat, "nr_periods"),
        cpuThrottled: field(cpuStat, "nr_throttled"),
        oomKills: field(await text("memory", "memory.events"), "oom_kill"),
      };
    }
    const quota = Number(await text("cpu", "cpu.cfs_quota_us"));
    const period = Number(await text("cpu", "cpu.cfs_period_us"));
    return {
      limits: { cpus: quota / period, memoryBytes: Number(await text("memory", "memory.limit_in_bytes")), pids, cpuWeight: Math.round(Number(await text("cpu", "cpu.shares")) / 10.24) },
      memoryBytes: Number(await text("memory", "memory.usage_in_bytes")),
      cpuPeriods: field(cpuStat, "nr_periods"),
      cpuThrottled: field(cpuStat, "nr_throttled"),
      oomKills: field(await text("memory", "memory.oom_control"), "oom_kill"),
    };
  }

  /**
   * Removes the VM's cgroup. Whatever still runs in it is killed first: a
   * QEMU whose pid was never recorded (the server died while starting it)
   * is found this way, and a cgroup with members cannot be removed. Idempotent.
   */
  async remove(name: string): Promise<void> {
    for (const dir of this.dirs(name)) {
      for (let attempt = 0; ; attempt++) {
        try {
          await rmdir(dir);
          break;
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === "ENOENT") break;
          if (code !== "EBUSY" || attempt >= 500) throw new Error(`cannot remove cgroup ${dir}: ${(err as Error).message}`, { cause: err });
          await killMembers(dir);
          await sleep(10);
        }
      }
    }
  }

  /**
   * Caps the memory of all VMs together: when they all allocate at once the
   * kernel reclaims and, failing that, OOM-kills inside the parent (the
   * biggest QEMU), never the server or the rest of the host. Written at every
   * create, so a changed setting applies without a restart.
   */
  private async limitParent(): Promise<void> {
    if (this.parentMemoryBytes === undefined) return;
    const dir = join(this.layout.mounts.memory, this.parent);
    try {
      if (this.layout.version === 2) await writeFile(join(dir, "memory.max"), String(this.parentMemoryBytes));
      else await writeFile(join(dir, "memory.limit_in_bytes"), String(this.parentMemoryBytes));
    } catch (err) {
      throw new Error(`cannot limit the memory of all VMs (${dir}) to ${this.parentMemoryBytes} bytes: ${(err as Error).message}`, { cause: err });
    }
  }

  /** The parent's memory use, limit and limit hits; undefined without a parent limit or before the first VM. */
  async readParentMemory(): Promise<ParentMemoryReading | undefined> {
    if (this.parentMemoryBytes === undefined) return undefined;
    const dir = join(this.layout.mounts.memory, this.parent);
    const num = async (file: string) => Number((await readFile(join(dir, file), "utf8")).trim());
    const stallUs = async (file: string, kind: "some" | "full") => Number(new RegExp(`^${kind} .*total=(\\d+)`, "m").exec(await readFile(file, "utf8"))?.[1] ?? 0);
    try {
      // Read once for every field this reading takes from it.
      const memoryStat = await readFile(join(dir, "memory.stat"), "utf8");
      const stat = (key: string) => Number(new RegExp(`^${key} (\\d+)`, "m").exec(memoryStat)?.[1] ?? 0);
      if (this.layout.version === 2) {
        const events = await readFile(join(dir, "memory.events"), "utf8");
        return {
          at: Date.now(),
          usageBytes: await num("memory.current"),
          limitBytes: await num("memory.max"),
          limitHits: Number(/^max (\d+)/m.exec(events)?.[1] ?? 0),
          stallUs: await stallUs(join(dir, "memory.pressure"), "full"),
          fileBytes: stat("file"),
          mappedFileBytes: stat("file_mapped"),
        };
      }
      return {
        at: Date.now(),
        usageBytes: await num("memory.usage_in_bytes"),
        limitBytes: await num("memory.limit_in_bytes"),
        limitHits: await num("memory.failcnt"),
        stallUs: await stallUs("/proc/pressure/memory", "some"),
        fileBytes: stat("total_cache"),
        mappedFileBytes: stat("total_mapped_file"),
      };
    } catch {
      return undefined;
    }
  }

  /**
   * SIGKILLs what runs in the VM cgroup with the most anonymous memory (what
   * it allocated; page cache charged to it, such as a snapshot's pages it
   * happened to read first, is not its doing); returns its name and that.
   */
  async killBiggest(): Promise<{ name: string; bytes: number } | undefined> {
    const parent = join(this.layout.mounts.memory, this.parent);
    const key = this.layout.version === 2 ? "anon" : "rss";
    let biggest: { name: string; bytes: number } | undefined;
    for (const entry of await readdir(parent, { withFileTypes: true }).catch(() => [])) {
      if (!entry.isDirectory()) continue;
      const stat = await readFile(join(parent, entry.name, "memory.stat"), "utf8").catch(() => "");
      const bytes = Number(new RegExp(`^${key} (\\d+)`, "m").exec(stat)?.[1] ?? 0);
      if (!biggest || bytes > biggest.bytes) biggest = { name: entry.name, bytes };
    }
    if (biggest) for (const dir of this.dirs(biggest.name)) await killMembers(dir);
    return biggest;
  }

  /**
   * Kills every process in every VM cgroup under the parent (the lease
   * fence, src/lifecycle/lease-fence.ts: a node's QEMUs must not outlive its
   * lease); returns their pids. Every QEMU of the node is in one, whatever
   * its command line, including one whose pid was never recorded.
   */
  async killAll(): Promise<number[]> {
    const killed = new Set<number>();
    for (const mount of new Set(Object.values(this.layout.mounts))) {
      const parent = join(mount, this.parent);
      for (const entry of await readdir(parent, { withFileTypes: true }).catch(() => [])) {
        if (entry.isDirectory()) for (const pid of await killMembers(join(parent, entry.name))) killed.add(pid);
      }
    }
    return [...killed];
  }

  /** v2 only: a controller limits a child only if every ancestor delegates it. */
  private async enableV2Controllers(): Promise<void> {
    const root = this.layout.mounts.cpu;
    const enable = CONTROLLERS.map((c) => `+${c}`).join(" ");
    let dir = root;
    for (const part of ["", ...this.parent.split("/").filter(Boolean)]) {
      dir = join(dir, part);
      await mkdir(dir, { recursive: true });
      await writeFile(join(dir, "cgroup.subtree_control"), enable);
    }
  }
}

/** SIGKILLs every process in a cgroup (its `cgroup.procs`; they leave it as they die); returns the pids it signalled. */
async function killMembers(dir: string): Promise<number[]> {
  const procs = await readFile(join(dir, "cgroup.procs"), "utf8").catch(() => "");
  const killed: number[] = [];
  for (const pid of procs.split("\n").filter(Boolean).map(Number)) {
    try {
      process.kill(pid, "SIGKILL");
      killed.push(pid);
    } catch {
      // gone already
    }
  }
  return killed;
}

async function writeOptional(file: string, value: string): Promise<void> {
  if (await access(file).then(() => true, () => false)) await writeFile(file, value);
}
