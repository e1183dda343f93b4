import { chmod, mkdir, readFile, rm, stat, symlink, writeFile } from "node:fs/promises";
import { dirname, isAbsolute, join } from "node:path";
import { Cgroups, detectCgroups, GUARD_READINGS, stuckAtCap, type CgroupReading, type ParentMemoryReading } from "./cgroups.ts";
import { hostMemoryBudget } from "../host-memory.ts";

export { Cgroups, detectCgroups, type CgroupReading } from "./cgroups.ts";

/**
 * Every QEMU process runs in a jail of its own (SECURITY.md), in the spirit of
 * Firecracker's jailer, built from util-linux tools so no helper binary of
 * ours runs as root:
 *
 *   unshare --mount --pid --fork        own mount and PID namespaces (QEMU is PID 1)
 *     bash (as root, inside)            closes inherited descriptors, joins the
 *                                       VM's cgroup, bind-mounts what QEMU
 *                                       needs into a skeleton root, pivot_root into
 *                                       it and detaches the host's tree
 *       prlimit                         open files, file size, tasks, no core dumps
 *         setpriv                       the VM's own uid/gid, no groups, no
 *                                       capabilities, no_new_privs
 *           qemu-system-x86_64 -sandbox on,…   QEMU's seccomp filter
 *
 * The environment is PATH only and the process holds no descriptor but
 * /dev/null and its log on 0–2 and those `command` is told to keep (its
 * console, QMP socket, saved state). The jail's files (skeleton root, mount
 * table) sit in the VM's directory, and its cgroup is named after the VM's
 * process, so a restarted server finds them from the VM's record.
 */

/** uids (= gids) given to VM processes (QEMU and its passt): one per VM, owned by no account. */
export interface UidRange {
  first: number;
  count: number;
}

const DEFAULT_UIDS: UidRange = { first: 0x5c00_0000, count: 0x0100_0000 };

/** The VM uid range: COCOON_VM_UIDS=`first-last`, else 1543503872–1560281087. */
export function vmUidRange(env = process.env): UidRange {
  const raw = env.COCOON_VM_UIDS;
  if (!raw) return DEFAULT_UIDS;
  const m = /^(\d+)-(\d+)$/.exec(raw);
  const first = Number(m?.[1]);
  const last = Number(m?.[2]);
  if (!m || first < 1000 || last < first + 15 || last > 0xffff_fffe) {
    throw new Error(`COCOON_VM_UIDS must be FIRST-LAST with 1000 <= FIRST, at least 16 ids, LAST < 4294967295; got "${raw}"`);
  }
  return { first, count: last - first + 1 };
}

export interface JailConfig {
  /** Cgroup (relative to each hierarchy's root) under which VM cgroups are made. */
  cgroupParent: string;
  /** RLIMIT_NOFILE. */
  maxOpenFiles: number;
  /** RLIMIT_FSIZE: the largest file QEMU may write (its disk overlay). */
  maxFileBytes: number;
  /** pids.max and RLIMIT_NPROC: QEMU's threads. */
  maxTasks: number;
  /**
   * CPU beyond the vCPUs, in CPUs. A vCPU thread never uses more than one
   * CPU, so the cap really bounds QEMU's other threads (main loop, I/O,
   * migration): without headroom a restore, which runs them beside the vCPU,
   * is throttled.
   */
  cpuHeadroom: number;
  /** Memory all VMs may use together, in bytes: the limit of their parent cgroup (host-memory.ts). */
  vmMemoryBytes: number;
}

/**
 * The jail's settings, or undefined when QEMU runs unjailed: COCOON_JAIL=off
 * (the baseline for measurements), or a server not running as root (it cannot
 * change uid, mount or make cgroups; the server logs that VMs are unconfined).
 */
export function jailConfigFromEnv(env = process.env): JailConfig | undefined {
  if (env.COCOON_JAIL === "off" || process.getuid?.() !== 0) return undefined;
  if (env.COCOON_JAIL !== undefined && env.COCOON_JAIL !== "on") throw new Error(`COCOON_JAIL must be "on" or "off", got "${env.COCOON_JAIL}"`);
  const cgroupParent = env.COCOON_CGROUP_PARENT ?? "cocoon";
  if (!/^[A-Za-z0-9_.-]+(\/[A-Za-z0-9_.-]+)*$/.test(cgroupParent) || cgroupParent.split("/").some((p) => p === "." || p === "..")) {
    throw new Error(`COCOON_CGROUP_PARENT must be a relative cgroup path of plain names, got "${cgroupParent}"`);
  }
  return {
    cgroupParent,
    maxOpenFiles: 4096,
    // The largest disk (32 GiB) plus qcow2 metadata.
    maxFileBytes: 34 * 1024 ** 3,
    maxTasks: 512,
    // Half a CPU: a restore runs QEMU's main loop beside the vCPU; measured in bench/jail.ts.
    cpuHeadroom: 0.5,
    vmMemoryBytes: hostMemoryBudget(env).vmMemoryMiB * 2 ** 20,
  };
}

/** What one VM's QEMU may see, besides /usr (read-only) and /dev/null, /dev/zero, /dev/urandom. */
export interface JailMounts {
  readOnly: string[];
  readWrite: string[];
  devices: string[];
}

/** A prepared jail: how to start QEMU in it. */
export interface Jail {
  /**
   * argv that runs `qemuArgv` (whose first element is the binary) inside the
   * jail; `lastFd` is the highest inherited descriptor QEMU keeps (2: none
   * beyond stdio).
   */
  command(qemuArgv: string[], lastFd: number): string[];
  /** Where the jail writes QEMU's host pid (inside, QEMU is PID 1). */
  pidfile: string;
}

/**
 * Runs as root inside the new namespaces; arguments: the highest descriptor
 * to keep, skeleton root, mount table, host pid file, the cgroup.procs files
 * to join, `--`, the command.
 * pivot_root needs /proc to find the old root's mounts, so a /proc of the
 * jail's own PID namespace is mounted for that moment only. (bash, not sh:
 * dash cannot close descriptors above 9.)
 */
const JAIL_SCRIPT = `set -eu
for fd in /proc/self/fd/*; do fd=\${fd##*/}; if [ "$fd" -gt "$1" ]; then eval "exec $fd>&-"; fi; done
root=$2 fstab=$3 pidfile=$4
shift 4
while [ "$1" != -- ]; do echo 0 > "$1"; shift; done
shift
read -r pid _ < /proc/self/stat
echo "$pid" > "$pidfile"
mount --all --fstab "$fstab"
cd "$root"
pivot_root . .old
mount -t proc proc /proc
umount --lazy /.old /proc
cd /
exec env -i "PATH=$PATH" "$@"`;

const DEFAULT_DEVICES = ["/dev/null", "/dev/zero", "/dev/urandom"];

/** Under contention VMs share the host's CPU by their vCPUs (the default weight, 100, per vCPU). */
const vcpuCpuWeight = (vcpus: number) => Math.min(10_000, 100 * vcpus);

/**
 * The weight of a process started ahead of its VM (a pre-started one): its
 * start yields to running VMs, on a host where it would otherwise slow the
 * guest that just took the previous one.
 */
const BACKGROUND_CPU_WEIGHT = 1;

export class Jailer {
  private readonly cgroups: Cgroups;
  private readonly memoryGuard: NodeJS.Timeout;
  /** Why the guard killed a VM's QEMU, by cgroup name, until its exit is handled (exitCause) or its jail released. */
  private readonly guardKills = new Map<string, string>();

  constructor(
    readonly config: JailConfig,
    log: (msg: string) => void = () => undefined,
  ) {
    this.cgroups = new Cgroups(detectCgroups(), config.cgroupParent, config.vmMemoryBytes);
    // The VMs' memory cap, watched once a second (one file of the parent,
    // whatever the number of VMs): when they are stuck at it the biggest VM's
    // QEMU is killed, as the kernel's OOM killer would, but before every VM crawls.
    const readings: ParentMemoryReading[] = [];
    let busy = false;
    this.memoryGuard = setInterval(() => {
      if (busy) return;
      busy = true;
      void (async () => {
        const reading = await this.cgroups.readParentMemory();
        if (!reading) return;
        readings.push(reading);
        if (readings.length > GUARD_READINGS) readings.shift();
        if (!stuckAtCap(readings)) return;
        readings.length = 0;
        const killed = await this.cgroups.killBiggest();
        if (!killed) return;
        const why = `all VMs at their ${Math.round(reading.limitBytes / 2 ** 20)} MiB cap for ${GUARD_READINGS} s`;
        this.guardKills.set(killed.name, `the memory guard killed it: ${why}, and it had allocated the most (${Math.round(killed.bytes / 2 ** 20)} MiB)`);
        log(`memory guard: ${why}: killed ${killed.name} (${Math.round(killed.bytes / 2 ** 20)} MiB allocated)`);
      })()
        .catch((err: Error) => log(`memory guard: ${err.message}`))
        .finally(() => (busy = false));
    }, 1000).unref();
  }

  /** The file pages all VMs' QEMUs map, charged to their parent cgroup, in MiB (0 without a reading). */
  async vmsMappedFileMiB(): Promise<number> {
    return ((await this.cgroups.readParentMemory())?.mappedFileBytes ?? 0) / 2 ** 20;
  }

  /** Stops watching the VMs' memory cap. */
  close(): void {
    clearInterval(this.memoryGuard);
  }

  get cgroupVersion(): 1 | 2 {
    return this.cgroups.layout.version;
  }

  /** Where a VM's jail files live. */
  static dir(vmDir: string): string {
    return join(vmDir, "jail");
  }

  /** Where the jail records its QEMU's host pid (QEMU itself only knows its pid in the jail: 1). */
  static pidfile(vmDir: string): string {
    return join(Jailer.dir(vmDir), "qemu.pid");
  }

  /**
   * Builds the VM's jail: a skeleton root whose mount points mirror the host
   * paths QEMU is given (so its command line needs no rewriting), the mount
   * table that fills it, and a cgroup capping CPU at `vcpus` (plus
   * `cpuHeadroom`) and memory at `memoryBytes`.
   */
  async prepare(opts: { name: string; vmDir: string; uid: number; vcpus: number; memoryBytes: number; mounts: JailMounts; background?: boolean }): Promise<Jail> {
    const dir = Jailer.dir(opts.vmDir);
    const root = join(dir, "root");
    const fstab = join(dir, "fstab");
    const pidfile = Jailer.pidfile(opts.vmDir);
    const release = () => this.release(opts.name, opts.vmDir);
    await rm(dir, { recursive: true, force: true });
    await mkdir(root, { recursive: true, mode: 0o755 });
    await chmod(dir, 0o700);
    const entries: [source: string, options: string][] = [[root, "bind"], ["/usr", "bind,ro"]];
    for (const p of opts.mounts.readOnly) entries.push([p, "bind,ro,nosuid,nodev,noexec"]);
    for (const p of opts.mounts.readWrite) entries.push([p, "bind,nosuid,nodev,noexec"]);
    for (const p of [...DEFAULT_DEVICES, ...opts.mounts.devices]) entries.push([p, "bind,nosuid,noexec"]);
    for (const d of ["usr", "dev", ".old", "proc"]) await mkdir(join(root, d), { recursive: true });
    for (const [link, target] of [["lib", "usr/lib"], ["lib64", "usr/lib64"], ["bin", "usr/bin"], ["sbin", "usr/sbin"]]) {
      await symlink(target!, join(root, link!));
    }
    for (const [source] of entries.slice(2)) {
      if (!isAbsolute(source)) throw new Error(`jail mount ${source} is not an absolute path`);
      const target = join(root, source);
      await mkdir(dirname(target), { recursive: true });
      if ((await stat(source)).isDirectory()) await mkdir(target, { recursive: true });
      else await writeFile(target, "");
    }
    const table = entries.map(([source, options], i) => `${fstabPath(source)} ${fstabPath(i === 0 ? root : join(root, source))} none ${options} 0 0`);
    await writeFile(fstab, `${table.join("\n")}\n`, { mode: 0o600 });
    try {
      const procs = await this.cgroups.create(opts.name, {
        cpus: opts.vcpus + this.config.cpuHeadroom,
        memoryBytes: opts.memoryBytes,
        pids: this.config.maxTasks,
        cpuWeight: opts.background ? BACKGROUND_CPU_WEIGHT : vcpuCpuWeight(opts.vcpus),
      });
      const c = this.config;
      const ids = String(opts.uid);
      return {
        pidfile,
        command: (qemuArgv, lastFd) => [
          "unshare", "--mount", "--pid", "--fork", "--propagation", "private",
          "bash", "-c", JAIL_SCRIPT, "cocoon-jail", String(lastFd), root, fstab, pidfile, ...procs, "--",
          "prlimit", `--nofile=${c.maxOpenFiles}`, `--fsize=${c.maxFileBytes}`, `--nproc=${c.maxTasks}`, "--core=0", "--",
          "setpriv", `--reuid=${ids}`, `--regid=${ids}`, "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
          ...qemuArgv,
        ],
      };
    } catch (err) {
      await release();
      throw err;
    }
  }

  /** Gives a process started in the background (`prepare`) its VM's share of CPU. */
  foreground(name: string, vcpus: number): Promise<void> {
    return this.cgroups.setCpuWeight(name, vcpuCpuWeight(vcpus));
  }

  /** The VM's cgroup directories (one per hierarchy). */
  cgroupDirs(name: string): string[] {
    return this.cgroups.dirs(name);
  }

  /** The VM's cgroup limits and counters (for tests and diagnostics). */
  readCgroup(name: string): Promise<CgroupReading> {
    return this.cgroups.read(name);
  }

  /**
   * Why a VM's QEMU that exited by itself was killed, when its memory is why:
   * the memory guard, or the kernel's OOM killer (counted in the VM's cgroup,
   * so this must be read before the cgroup is removed).
   */
  async exitCause(name: string): Promise<string | undefined> {
    const guard = this.guardKills.get(name);
    if (guard) return guard;
    const reading = await this.cgroups.read(name).catch(() => undefined);
    return reading?.oomKills ? "the kernel's OOM killer killed it: its memory limit, or the cap all VMs share, was reached" : undefined;
  }

  /**
   * Removes the VM's cgroup and jail files. The skeleton is only ever mounted
   * inside the jail's own namespace; should a mount show through on the host
   * (a host with shared propagation forced), removing it would descend into
   * /usr, so that is refused instead.
   */
  async release(name: string, vmDir: string): Promise<void> {
    this.guardKills.delete(name);
    await this.cgroups.remove(name);
    const dir = Jailer.dir(vmDir);
    const mounts = await readFile("/proc/self/mountinfo", "utf8");
    if (mounts.split("\n").some((l) => l.split(" ")[4]?.startsWith(`${dir}/`))) {
      throw new Error(`refusing to remove ${dir}: something is mounted under it on the host`);
    }
    await rm(dir, { recursive: true, force: true });
  }
}

/** fstab fields are space-separated: escape whitespace and backslashes in paths. */
function fstabPath(p: string): string {
  return p.replace(/[\\\s]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, "0")}`);
}
