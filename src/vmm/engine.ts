import { randomBytes, randomInt } from "node:crypto";
import { EventEmitter } from "node:events";
import { chmod, chown, mkdir, open, readdir, readFile, rename, rm, truncate, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { checkIntRange, InvalidArgumentError } from "../errors.ts";
import { exists, fsyncDir, fsyncFile, writeFileAtomic } from "../util/files.ts";
import { KeyedMutex } from "../util/keyed-mutex.ts";
import { freeLoopbackPort } from "../util/ports.ts";
import { run } from "../util/process.ts";
import { AgentClient } from "./agent-client.ts";
import { jailConfigFromEnv, Jailer, qcow2BackingChain, vmUidRange, type Jail, type JailConfig } from "./jail/index.ts";
import { killRecordedQemu, Machine } from "./machine.ts";
import { NetworkManager, parseEgress, type Egress, type VmNetworkRecord } from "./network/index.ts";
import {
  AGENT_PORT,
  guestCmdline,
  machinePaths,
  qemuOverheadMiB,
  type Accelerator,
  type GuestMemory,
  type MachineSpec,
  type PortForward,
} from "./qemu.ts";

/** Kernel and initramfs every VM boots (see vmm/guest). */
export interface GuestBootAssets {
  kernel: string;
  initramfs: string;
}

export interface EngineConfig {
  /** Holds `vms/<id>/` (one directory per VM). */
  dataDir: string;
  assets: GuestBootAssets;
  accelerator: Accelerator;
  /** Watchdog for a cold boot to agent-ready; a boot that misses it is killed and retried once. */
  bootTimeoutMs?: number;
  /** VMs per snapshot kept restored and warm for instant launches (0: none). */
  warmPoolSize?: number;
  /** The QEMU jail; default from the environment (`jailConfigFromEnv`), `false` runs QEMU unjailed. */
  jail?: JailConfig | false;
  log?: (msg: string) => void;
}

/** What a snapshot directory holds, written last (its presence means the snapshot is complete). */
export interface SnapshotManifest {
  /** `SNAPSHOT_FORMAT`: 2 has files that jailed clones can open (see `snapshot`). */
  formatVersion: typeof SNAPSHOT_FORMAT;
  createdAt: string;
  accelerator: Accelerator;
  vcpus: number;
  memoryMiB: number;
  kernel: string;
  initramfs: string;
  cmdline: string;
  /** The agent secret inside the snapshot's memory; each clone replaces it on restore. */
  token: string;
  /** Guest ports every clone forwards to a host loopback port (the app's). */
  guestPorts: number[];
}

export interface Snapshot {
  dir: string;
  manifest: SnapshotManifest;
}

/** Layout of snapshot directories this engine writes and reads (`SnapshotManifest.formatVersion`). */
export const SNAPSHOT_FORMAT = 2;

const snapshotFiles = (dir: string) => ({
  disk: join(dir, "disk.qcow2"),
  memory: join(dir, "memory"),
  state: join(dir, "state"),
  manifest: join(dir, "manifest.json"),
});

export type VmStatus = "starting" | "running" | "paused" | "suspended" | "failed";

/** A VM's runtime record, `vms/<id>/vm.json`: enough to re-adopt or resume it after a server restart. */
export interface VmRecord {
  id: string;
  status: VmStatus;
  failureReason?: string;
  snapshotDir: string;
  vcpus: number;
  memoryMiB: number;
  /** A warm-pool VM not yet handed out; discarded on restart. */
  pooled?: boolean;
  /** Secret of this VM's agent (mode 0600 file). */
  token: string;
  /** QEMU pid (on the host) while running. */
  pid?: number;
  /** The uid (= gid) the VM's QEMU and passt run as. */
  uid: number;
  agentPort: number;
  /** Guest app ports and the host loopback ports they are reachable on. */
  forwards: PortForward[];
  /** Egress policy and its host-side identity; absent in older records (= egress "none"). */
  network?: VmNetworkRecord;
  createdAt: string;
}

const vmFiles = (dir: string) => ({
  record: join(dir, "vm.json"),
  disk: join(machinePaths(dir).dir, "disk.qcow2"),
  suspended: join(dir, "suspended.state"),
});

/** A VM the engine manages. `agent` is usable while status is "running". */
export class MicroVm {
  machine: Machine | undefined;
  agent: AgentClient;

  constructor(
    readonly dir: string,
    public record: VmRecord,
  ) {
    this.agent = new AgentClient(record.agentPort, record.token);
  }

  get id(): string {
    return this.record.id;
  }

  get status(): VmStatus {
    return this.record.status;
  }

  /** Host loopback port where a guest port is forwarded, if it is. */
  hostPort(guestPort: number): number | undefined {
    return this.record.forwards.find((f) => f.guestPort === guestPort)?.hostPort;
  }
}

/** Thrown for a request that cannot be honoured in the VM's current status. */
export class InvalidVmStateError extends Error {
  constructor(
    readonly vmId: string,
    readonly status: VmStatus,
    action: string,
  ) {
    super(`cannot ${action} microVM ${vmId}: it is ${status}`);
    this.name = "InvalidVmStateError";
  }
}

export class VmNotFoundError extends Error {
  constructor(readonly vmId: string) {
    super(`microVM ${vmId} not found`);
    this.name = "VmNotFoundError";
  }
}

/** A qcow2 file's virtual size in bytes (its header's size field). */
async function qcow2VirtualSize(path: string): Promise<number> {
  const header = Buffer.alloc(32);
  const fh = await open(path, "r");
  try {
    await fh.read(header, 0, 32, 0);
  } finally {
    await fh.close();
  }
  if (header.readUInt32BE(0) !== 0x514649fb) throw new Error(`${path} is not a qcow2 file`);
  return Number(header.readBigUInt64BE(24));
}

/** Per-VM limits (DESIGN.md). */
export const VM_LIMITS = { vcpus: { min: 1, max: 16 }, memoryMiB: { min: 128, max: 32768 } } as const;

function checkShape(shape: { vcpus: number; memoryMiB: number }): void {
  checkIntRange("vcpus", shape.vcpus, VM_LIMITS.vcpus);
  checkIntRange("memoryMiB", shape.memoryMiB, VM_LIMITS.memoryMiB);
}

export interface BootOpts {
  /** Directory that will become the snapshot directory. */
  dir: string;
  /** qcow2 the VM's disk is layered on (copy-on-write; never written). */
  backingDisk: string;
  vcpus: number;
  memoryMiB: number;
  guestPorts?: number[];
  /** Egress while the template runs (image builds install packages): default "internet". */
  egress?: Egress;
}

/**
 * A running template, on disk while it runs: templates are never adopted (a
 * boot or build cut short by a restart has failed), so this is what a
 * restarted server needs to end what one left on the host.
 */
interface TemplateRecord {
  name: string;
  dir: string;
  uid: number;
  network: VmNetworkRecord;
}

/** A cold-booted VM whose memory lives in a shared file: the raw material of a snapshot. */
export interface TemplateVm {
  dir: string;
  machine: Machine;
  agent: AgentClient;
  spec: MachineSpec;
  token: string;
  guestPorts: number[];
  forwards: PortForward[];
  network: VmNetworkRecord;
  uid: number;
}

/**
 * The VMM engine: cold boot, snapshot, launch from snapshot, suspend, resume,
 * terminate, and re-adoption of VMs left running by a previous server.
 * Operations on one VM are serialized. Emits `exit` (vm, reason) when a
 * running VM's QEMU process dies on its own.
 */
export class Engine extends EventEmitter {
  /** VMs handed out (running, suspended or failed); pooled VMs are not here. */
  private readonly vms = new Map<string, MicroVm>();
  /** Warm VMs per snapshot directory, and the fill in progress for each. */
  private readonly warm = new Map<string, MicroVm[]>();
  private readonly filling = new Map<string, Promise<void>>();
  private closing = false;
  private readonly locks = new KeyedMutex();
  private readonly vmsDir: string;
  private readonly templatesDir: string;
  private readonly network: NetworkManager;
  /** Absent when QEMU runs unjailed (see `EngineConfig.jail`). */
  readonly jailer: Jailer | undefined;
  /** uids held by this engine's VMs, pooled VMs and templates. */
  private readonly uids = new Set<number>();

  private constructor(private readonly config: EngineConfig) {
    super();
    this.vmsDir = join(config.dataDir, "vms");
    this.templatesDir = join(config.dataDir, "templates");
    this.network = new NetworkManager(config.log);
    const jail = config.jail === false ? undefined : (config.jail ?? jailConfigFromEnv());
    this.jailer = jail && new Jailer(jail);
    if (!this.jailer) config.log?.("QEMU runs unjailed (COCOON_JAIL=off or not root): VMs share the server's uid and namespaces");
  }

  get accelerator(): Accelerator {
    return this.config.accelerator;
  }

  /** Opens the engine over a data directory and re-adopts every VM found there. */
  static async open(config: EngineConfig): Promise<Engine> {
    const engine = new Engine(config);
    await mkdir(engine.vmsDir, { recursive: true });
    await mkdir(engine.templatesDir, { recursive: true });
    await engine.adoptAll();
    await engine.endOrphanedTemplates();
    return engine;
  }

  get(id: string): MicroVm {
    const vm = this.vms.get(id);
    if (!vm) throw new VmNotFoundError(id);
    return vm;
  }

  list(): MicroVm[] {
    return [...this.vms.values()];
  }

  // ---- snapshots -------------------------------------------------------------

  /**
   * Cold-boots a VM whose RAM is a shared file in `opts.dir`, waits for its
   * agent, and returns it running. A boot that misses the watchdog is killed
   * and retried once (TCG boots occasionally spin before init).
   */
  async bootTemplate(opts: BootOpts): Promise<TemplateVm> {
    checkShape(opts);
    if (!(await exists(opts.backingDisk))) throw new InvalidArgumentError("backingDisk", `disk ${opts.backingDisk} does not exist`);
    await mkdir(opts.dir, { recursive: true });
    const files = snapshotFiles(opts.dir);
    const timeoutMs = this.config.bootTimeoutMs ?? (this.accelerator === "tcg" ? 90_000 : 30_000);
    for (let attempt = 1; ; attempt++) {
      await rm(files.disk, { force: true });
      await rm(files.memory, { force: true });
      await run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", opts.backingDisk, "-F", "qcow2", files.disk]);
      // The template's QEMU writes its RAM and disk: both belong to its uid until `snapshot`.
      await writeFile(files.memory, "", { mode: 0o600 });
      await truncate(files.memory, opts.memoryMiB * 1024 * 1024);
      const token = newToken();
      const guestPorts = opts.guestPorts ?? [];
      const forwards = await allocateForwards([AGENT_PORT, ...guestPorts]);
      const uid = this.allocateUid();
      const network = this.network.allocate(opts.egress ?? "internet", uid);
      await mkdir(machinePaths(opts.dir).dir, { recursive: true, mode: 0o700 });
      await this.giveToVmUid(opts.dir, uid, [files.disk, files.memory]);
      const spec: MachineSpec = {
        vmDir: opts.dir,
        name: `template-${randomBytes(3).toString("hex")}`,
        accelerator: this.accelerator,
        vcpus: opts.vcpus,
        memoryMiB: opts.memoryMiB,
        memory: { kind: "file", path: files.memory, shared: true },
        kernel: this.config.assets.kernel,
        initramfs: this.config.assets.initramfs,
        cmdline: guestCmdline({ accelerator: this.accelerator, token, hostname: "cocoon" }),
        disk: files.disk,
        forwards,
      };
      const record: TemplateRecord = { name: spec.name, dir: opts.dir, uid, network };
      await writeFileAtomic(this.templateRecordPath(record.name), JSON.stringify(record), 0o600);
      const machine = await this.startMachine(spec, network, uid).catch(async (err: unknown) => {
        await this.forgetTemplate(record);
        throw err;
      });
      const agent = new AgentClient(forwards[0]!.hostPort, token);
      try {
        await agent.waitReady(timeoutMs);
        return { dir: opts.dir, machine, agent, spec, token, guestPorts, forwards: forwards.slice(1), network, uid };
      } catch (err) {
        agent.close();
        await this.endTemplate({ machine, network, uid, spec }, 0);
        const console = await readFile(machinePaths(opts.dir).console, "utf8").catch(() => "");
        if (attempt >= 2) {
          throw new Error(`cold boot failed twice: ${(err as Error).message}; console: ${console.slice(-1500)}`);
        }
        this.config.log?.(`cold boot attempt ${attempt} failed (${(err as Error).message}); retrying`);
      }
    }
  }

  /**
   * Freezes a running template into a snapshot: flushes the guest's disk,
   * pauses it, writes the device state, ends the process and hands the files
   * back to root. The manifest is written last.
   *
   * Clones map the memory file privately (copy-on-write), but QEMU 7.2 opens
   * it read-write even so (8.1+ falls back to read-only), and a jailed clone
   * runs as a uid of its own: hence mode 0666. The snapshot directory is not
   * reachable by VM uids on the host; inside a jail only the clone's own
   * image's files are mounted (SECURITY.md states what this leaves open).
   */
  async snapshot(template: TemplateVm): Promise<Snapshot> {
    const files = snapshotFiles(template.dir);
    try {
      await template.agent.sync();
      await template.machine.save(files.state);
    } finally {
      template.agent.close();
      await this.endTemplate(template);
    }
    // The memory file is the snapshot's RAM: it must be on disk before anyone maps it.
    await fsyncFile(files.memory);
    await fsyncFile(files.disk);
    const qemuDir = machinePaths(template.dir);
    for (const p of [files.memory, files.disk, qemuDir.dir]) await chown(p, 0, 0).catch(() => undefined);
    await chmod(files.memory, 0o666);
    await chmod(files.disk, 0o444);
    await chmod(template.dir, 0o700);
    for (const p of Object.values(qemuDir)) if (!p.endsWith(".log") && p !== qemuDir.dir) await rm(p, { force: true });
    const manifest: SnapshotManifest = {
      formatVersion: SNAPSHOT_FORMAT,
      createdAt: new Date().toISOString(),
      accelerator: template.spec.accelerator,
      vcpus: template.spec.vcpus,
      memoryMiB: template.spec.memoryMiB,
      kernel: template.spec.kernel,
      initramfs: template.spec.initramfs,
      cmdline: template.spec.cmdline,
      token: template.token,
      guestPorts: template.guestPorts,
    };
    await writeFileAtomic(files.manifest, JSON.stringify(manifest, null, 2), 0o600);
    return { dir: template.dir, manifest };
  }

  /** Ends a template without snapshotting it (its process and its network are gone). */
  async discardTemplate(template: TemplateVm): Promise<void> {
    template.agent.close();
    await this.endTemplate(template, 0);
  }

  private async endTemplate(template: Pick<TemplateVm, "machine" | "network" | "uid" | "spec">, graceMs?: number): Promise<void> {
    await template.machine.stop(graceMs);
    await this.network.stop(template.network);
    await this.forgetTemplate({ name: template.spec.name, uid: template.uid });
  }

  private templateRecordPath(name: string): string {
    return join(this.templatesDir, `${name}.json`);
  }

  private async forgetTemplate(t: Pick<TemplateRecord, "name" | "uid">): Promise<void> {
    await rm(this.templateRecordPath(t.name), { force: true });
    this.uids.delete(t.uid);
  }

  /**
   * Ends the templates an earlier server left running or half set up (it was
   * killed mid-boot or mid-build): their QEMU if that pid is still theirs,
   * their jail and their network.
   */
  private async endOrphanedTemplates(): Promise<void> {
    for (const file of await readdir(this.templatesDir)) {
      const t = JSON.parse(await readFile(join(this.templatesDir, file), "utf8")) as TemplateRecord;
      await killRecordedQemu(this.jailer ? Jailer.pidfile(t.dir) : machinePaths(t.dir).pidfile, t.dir);
      await this.jailer?.release(t.name, t.dir);
      await this.network.stop(t.network);
      await rm(join(this.templatesDir, file), { force: true });
      this.config.log?.(`ended template VM ${t.name} (${t.dir}) left by an earlier server`);
    }
  }

  /** Reads a snapshot written by `snapshot`; fails clearly if it is incomplete or from an older layout. */
  static async loadSnapshot(dir: string): Promise<Snapshot> {
    const files = snapshotFiles(dir);
    if (!(await exists(files.manifest))) throw new InvalidArgumentError("snapshot", `no complete snapshot in ${dir}`);
    const manifest = JSON.parse(await readFile(files.manifest, "utf8")) as SnapshotManifest;
    if (manifest.formatVersion !== SNAPSHOT_FORMAT) {
      throw new InvalidArgumentError("snapshot", `snapshot in ${dir} has format ${String(manifest.formatVersion)}, this server reads ${SNAPSHOT_FORMAT}: rebuild the image`);
    }
    return { dir, manifest };
  }

  // ---- VM lifecycle ----------------------------------------------------------

  /**
   * Launches a VM from a snapshot: a QEMU process restores the snapshot's
   * device state over a private copy-on-write mapping of its memory file, with
   * a qcow2 overlay on its disk; then the agent is given new entropy, the time
   * and a secret of its own. Returns once the agent has answered.
   *
   * With a warm pool (`warmPoolSize`), the restore has already happened in the
   * background and the VM has served one exec (under TCG a fresh process must
   * translate every guest code path once, ~200 ms); launching then only
   * re-keys it. A caller-chosen `id` always takes the direct path.
   *
   * `guestPorts` adds ports forwarded to host loopback beyond the snapshot's
   * own (an app port chosen at create); forwards are set per QEMU process, so
   * such a VM takes the direct path too.
   *
   * `diskGiB` larger than the snapshot's disk grows the VM's root disk and
   * filesystem to it once the VM runs (`growDisk`); never shrinks.
   */
  async launch(snapshot: Snapshot, opts: { id?: string; egress?: Egress; guestPorts?: number[]; diskGiB?: number } = {}): Promise<MicroVm> {
    const m = snapshot.manifest;
    if (m.accelerator !== this.accelerator) {
      throw new Error(`snapshot was made under ${m.accelerator} but this host runs ${this.accelerator}: rebuild the image`);
    }
    // Validates the policy before anything starts. Warm VMs have egress "none" (a netdev is fixed per process).
    const egress = parseEgress(opts.egress ?? "none");
    const extraPorts = (opts.guestPorts ?? []).filter((p) => !m.guestPorts.includes(p));
    const warm = opts.id || egress !== "none" || extraPorts.length > 0 ? undefined : await this.takeWarm(snapshot);
    void this.prewarm(snapshot);
    const vm = warm ?? (await this.clone(snapshot, opts.id ?? newVmId(), false, egress, extraPorts));
    this.vms.set(vm.id, vm);
    if (opts.diskGiB !== undefined) {
      await this.growDisk(vm, opts.diskGiB).catch(async (err: unknown) => {
        await this.locks.run(vm.id, () => this.destroy(vm));
        throw err;
      });
    }
    return vm;
  }

  /**
   * Grows a running VM's root disk to `diskGiB` if it is smaller: the qcow2
   * overlay's virtual size through QMP `block_resize` (the guest kernel sees
   * the virtio config change), then the ext4 inside, online, by the agent.
   */
  private async growDisk(vm: MicroVm, diskGiB: number): Promise<void> {
    const bytes = diskGiB * 2 ** 30;
    await this.locks.run(vm.id, async () => {
      if (!vm.machine || vm.status !== "running") throw new InvalidVmStateError(vm.id, vm.status, "grow the disk of");
      if ((await qcow2VirtualSize(vmFiles(vm.dir).disk)) >= bytes) return;
      await vm.machine.resizeDisk(bytes);
      await vm.agent.growDisk(bytes);
    });
  }

  /**
   * Fills the snapshot's warm pool up to `warmPoolSize`; resolves when it is
   * full (or the engine closes). One fill runs per snapshot at a time.
   */
  prewarm(snapshot: Snapshot): Promise<void> {
    const size = this.config.warmPoolSize ?? 0;
    const running = this.filling.get(snapshot.dir);
    if (running || size === 0) return running ?? Promise.resolve();
    const pool = this.warm.get(snapshot.dir) ?? [];
    this.warm.set(snapshot.dir, pool);
    const fill = (async () => {
      try {
        while (pool.length < size && !this.closing) {
          const vm = await this.clone(snapshot, newVmId(), true);
          await vm.agent.exec({ command: ["true"] });
          pool.push(vm);
        }
      } catch (err) {
        this.config.log?.(`warm pool for ${snapshot.dir}: ${(err as Error).message}`);
      }
    })().finally(() => this.filling.delete(snapshot.dir)); // a microtask: runs after the set below
    this.filling.set(snapshot.dir, fill);
    return fill;
  }

  /** Hands out a pooled VM, re-keyed as if just restored; undefined if none is ready. */
  private async takeWarm(snapshot: Snapshot): Promise<MicroVm | undefined> {
    const pool = this.warm.get(snapshot.dir) ?? [];
    for (let vm = pool.shift(); vm; vm = pool.shift()) {
      const candidate = vm;
      try {
        return await this.locks.run(candidate.id, async () => {
          const token = newToken();
          await candidate.agent.restore({ newToken: token, hostname: candidate.id });
          candidate.record = { ...candidate.record, token, pooled: undefined, createdAt: new Date().toISOString() };
          await this.saveRecord(candidate);
          this.vms.set(candidate.id, candidate);
          return candidate;
        });
      } catch (err) {
        this.config.log?.(`warm VM ${candidate.id} unusable (${(err as Error).message}); discarding it`);
        await this.destroy(candidate);
      }
    }
    return undefined;
  }

  /** Restores a new VM from a snapshot (the direct launch path). */
  private async clone(
    snapshot: Snapshot,
    id: string,
    pooled: boolean,
    egress: Egress = "none",
    extraPorts: number[] = [],
  ): Promise<MicroVm> {
    const m = snapshot.manifest;
    const dir = join(this.vmsDir, id);
    const files = vmFiles(dir);
    await mkdir(dir, { recursive: false, mode: 0o700 });
    const forwards = await allocateForwards([AGENT_PORT, ...m.guestPorts, ...extraPorts]);
    const uid = this.allocateUid();
    const network = this.network.allocate(egress, uid);
    const vm = new MicroVm(dir, {
      id,
      status: "starting",
      pooled: pooled || undefined,
      snapshotDir: snapshot.dir,
      vcpus: m.vcpus,
      memoryMiB: m.memoryMiB,
      token: newToken(),
      agentPort: forwards[0]!.hostPort,
      forwards: forwards.slice(1),
      network,
      uid,
      createdAt: new Date().toISOString(),
    });
    return this.locks.run(id, async () => {
      try {
        // Recorded before QEMU starts, so a crash mid-launch leaves a record that
        // adoption cleans up instead of an untracked process.
        await this.saveRecord(vm);
        await mkdir(machinePaths(dir).dir, { mode: 0o700 });
        await run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", snapshotFiles(snapshot.dir).disk, "-F", "qcow2", files.disk]);
        await this.giveToVmUid(dir, uid, [files.disk]);
        const memory: GuestMemory = { kind: "file", path: snapshotFiles(snapshot.dir).memory, shared: false };
        await this.restoreInto(vm, memory, snapshotFiles(snapshot.dir).state, m.token);
        return vm;
      } catch (err) {
        await this.destroy(vm);
        throw err;
      }
    });
  }

  /** Ends the warm VMs of a snapshot (its image is being deleted); later launches of it would fail anyway. */
  async dropWarm(snapshotDir: string): Promise<void> {
    await this.filling.get(snapshotDir);
    for (const vm of this.warm.get(snapshotDir)?.splice(0) ?? []) await this.destroy(vm);
    this.warm.delete(snapshotDir);
  }

  /**
   * Suspends a running VM to disk: pauses it, writes its memory and device
   * state to its directory, and ends the QEMU process (no CPU, no RAM held).
   * The VM is recorded as suspended only once the state file is durable.
   */
  suspend(id: string): Promise<MicroVm> {
    return this.locks.run(id, async () => {
      const vm = this.get(id);
      if ((vm.status !== "running" && vm.status !== "paused") || !vm.machine) throw new InvalidVmStateError(id, vm.status, "suspend");
      const files = vmFiles(vm.dir);
      const tmp = `${files.suspended}.tmp`;
      const machine = vm.machine;
      machine.removeAllListeners("exit");
      try {
        await machine.save(tmp);
      } catch (err) {
        // The guest is intact in the paused process: let it run on.
        await machine.cont().catch(() => undefined);
        this.watchExit(vm);
        await rm(tmp, { force: true });
        throw err;
      }
      await rename(tmp, files.suspended);
      await fsyncDir(vm.dir);
      vm.record = { ...vm.record, status: "suspended", pid: undefined };
      await this.saveRecord(vm);
      vm.agent.close();
      await machine.stop();
      await this.network.stop(vm.record.network);
      vm.machine = undefined;
      return vm;
    });
  }

  /**
   * Pauses a running VM's vCPUs: its process and memory stay, it uses no CPU,
   * and its agent does not answer until `unpause`. Survives a server restart.
   */
  pause(id: string): Promise<MicroVm> {
    return this.setPaused(id, true);
  }

  unpause(id: string): Promise<MicroVm> {
    return this.setPaused(id, false);
  }

  private setPaused(id: string, paused: boolean): Promise<MicroVm> {
    return this.locks.run(id, async () => {
      const vm = this.get(id);
      const from: VmStatus = paused ? "running" : "paused";
      if (vm.status !== from || !vm.machine) throw new InvalidVmStateError(id, vm.status, paused ? "pause" : "unpause");
      await (paused ? vm.machine.pause() : vm.machine.cont());
      vm.record = { ...vm.record, status: paused ? "paused" : "running" };
      await this.saveRecord(vm);
      return vm;
    });
  }

  /** Resumes a suspended VM exactly where it was paused. */
  resume(id: string): Promise<MicroVm> {
    return this.locks.run(id, async () => {
      const vm = this.get(id);
      if (vm.status !== "suspended") throw new InvalidVmStateError(id, vm.status, "resume");
      const files = vmFiles(vm.dir);
      // Fresh host ports: the old ones were released with the old process.
      const forwards = await allocateForwards([AGENT_PORT, ...vm.record.forwards.map((f) => f.guestPort)]);
      vm.record = { ...vm.record, agentPort: forwards[0]!.hostPort, forwards: forwards.slice(1) };
      await this.restoreInto(vm, { kind: "anonymous" }, files.suspended, vm.record.token);
      await rm(files.suspended, { force: true });
      return vm;
    });
  }

  /** Ends a VM: its process is gone and its directory removed. Idempotent per VM. */
  terminate(id: string): Promise<void> {
    return this.locks.run(id, async () => {
      const vm = this.get(id);
      await this.destroy(vm);
    });
  }

  /**
   * Stops the warm pools and detaches from every VM without stopping it
   * (server shutdown or restart): the next engine re-adopts them.
   */
  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.filling.values());
    for (const pool of this.warm.values()) for (const vm of pool.splice(0)) await this.destroy(vm);
    for (const vm of this.vms.values()) {
      vm.machine?.removeAllListeners("exit");
      vm.machine?.detach();
      vm.agent.close();
      this.network.detach(vm.record.network);
    }
    this.vms.clear();
  }

  // ---- internals ---------------------------------------------------------------

  /** A uid of the VM range that no VM, pooled VM or template of this engine holds. */
  private allocateUid(): number {
    const range = vmUidRange();
    let uid: number;
    do uid = range.first + randomInt(range.count);
    while (this.uids.has(uid));
    this.uids.add(uid);
    return uid;
  }

  /**
   * Makes `<vmDir>/qemu/` and `files` (the disk and memory QEMU writes) the VM
   * uid's alone; unjailed, QEMU runs as the server and they stay the server's.
   */
  private async giveToVmUid(vmDir: string, uid: number, files: string[]): Promise<void> {
    const dir = machinePaths(vmDir).dir;
    if (!this.jailer) return;
    for (const p of [dir, ...files]) await chown(p, uid, uid);
    for (const p of files) await chmod(p, 0o600);
  }

  /** Starts the spec's network and its QEMU (jailed unless jails are off); on failure neither is left. */
  private async startMachine(spec: MachineSpec, network: VmNetworkRecord, uid: number): Promise<Machine> {
    spec.net = await this.network.start(network, spec.forwards);
    try {
      spec.jail = await this.prepareJail(spec, uid);
      return await Machine.start(spec);
    } catch (err) {
      await this.network.stop(network);
      throw err;
    }
  }

  /**
   * The jail of one QEMU process: its own files read-write (QEMU's directory,
   * a memory file, a template's disk, its passt socket), the boot files and
   * the disk's backing chain read-only, and a cgroup of the VM's vCPUs and
   * memory plus QEMU's overhead.
   */
  private async prepareJail(spec: MachineSpec, uid: number): Promise<Jail | undefined> {
    if (!this.jailer) return undefined;
    const qemuDir = machinePaths(spec.vmDir).dir;
    const readWrite = [qemuDir];
    if (spec.memory.kind === "file") readWrite.push(spec.memory.path);
    if (dirname(spec.disk) !== qemuDir) readWrite.push(spec.disk);
    if (spec.net?.kind === "passt") readWrite.push(dirname(spec.net.socket));
    return this.jailer.prepare({
      name: spec.name,
      vmDir: spec.vmDir,
      uid,
      vcpus: spec.vcpus,
      memoryBytes: (spec.memoryMiB + qemuOverheadMiB(spec.accelerator)) * 1024 * 1024,
      mounts: {
        readOnly: [spec.kernel, spec.initramfs, ...(await qcow2BackingChain(spec.disk))],
        readWrite,
        devices: spec.accelerator === "kvm" ? ["/dev/kvm"] : [],
      },
    });
  }

  /**
   * Ends what a VM holds on the host besides its directory: its QEMU process
   * (a Machine releases its own jail), or else the jail a process that is
   * gone or never started left behind; then its network.
   */
  private async endHostSide(vm: MicroVm, machine = vm.machine): Promise<void> {
    if (machine) await machine.stop(0);
    else await this.releaseJail(vm);
    await this.network.stop(vm.record.network);
  }

  /** Releases the jail of a VM whose process is gone (a Machine does this itself when it ends). */
  private async releaseJail(vm: MicroVm): Promise<void> {
    await this.jailer?.release(vm.id, vm.dir);
  }

  /** Starts QEMU paused, streams `stateFile` in, continues, and re-keys the agent. */
  private async restoreInto(vm: MicroVm, memory: GuestMemory, stateFile: string, agentToken: string): Promise<void> {
    const snapshot = await Engine.loadSnapshot(vm.record.snapshotDir);
    const spec: MachineSpec = {
      vmDir: vm.dir,
      name: vm.id,
      accelerator: this.accelerator,
      vcpus: vm.record.vcpus,
      memoryMiB: vm.record.memoryMiB,
      memory,
      kernel: snapshot.manifest.kernel,
      initramfs: snapshot.manifest.initramfs,
      cmdline: snapshot.manifest.cmdline,
      disk: vmFiles(vm.dir).disk,
      forwards: [{ hostPort: vm.record.agentPort, guestPort: AGENT_PORT }, ...vm.record.forwards],
      incomingState: stateFile,
    };
    const machine = await this.startMachine(spec, vm.record.network ?? { egress: "none" }, vm.record.uid);
    vm.machine = machine;
    try {
      await machine.restore();
      await machine.cont();
      vm.agent.close();
      vm.agent = new AgentClient(vm.record.agentPort, agentToken);
      await vm.agent.restore({ newToken: vm.record.token, hostname: vm.id });
    } catch (err) {
      await machine.stop(0);
      await this.network.stop(vm.record.network);
      vm.machine = undefined;
      throw err;
    }
    vm.record = { ...vm.record, status: "running", pid: machine.pid };
    await this.saveRecord(vm);
    this.watchExit(vm);
  }

  private watchExit(vm: MicroVm): void {
    vm.machine?.once("exit", () => {
      void this.locks.run(vm.id, async () => {
        if (vm.record.pooled) {
          const pool = this.warm.get(vm.record.snapshotDir) ?? [];
          if (pool.includes(vm)) pool.splice(pool.indexOf(vm), 1);
          await this.destroy(vm);
          return;
        }
        if (vm.status !== "running" && vm.status !== "paused") return;
        vm.machine = undefined;
        vm.agent.close();
        await this.network.stop(vm.record.network);
        const console = await readFile(machinePaths(vm.dir).console, "utf8").catch(() => "");
        await this.markFailed(vm, `QEMU process exited unexpectedly${console ? `; console: ${console.slice(-300).trim()}` : ""}`);
        this.emit("exit", vm, vm.record.failureReason);
      });
    });
  }

  private async markFailed(vm: MicroVm, reason: string): Promise<void> {
    vm.record = { ...vm.record, status: "failed", failureReason: reason, pid: undefined };
    await this.saveRecord(vm);
  }

  private async destroy(vm: MicroVm): Promise<void> {
    vm.machine?.removeAllListeners("exit");
    vm.agent.close();
    await this.endHostSide(vm);
    vm.machine = undefined;
    await rm(vm.dir, { recursive: true, force: true });
    this.vms.delete(vm.id);
    this.uids.delete(vm.record.uid);
  }

  private saveRecord(vm: MicroVm): Promise<void> {
    return writeFileAtomic(vmFiles(vm.dir).record, JSON.stringify(vm.record, null, 2), 0o600);
  }

  /**
   * Rebuilds the VM table from `vms/*\/vm.json` after a (re)start:
   * - running, process alive → re-attached (a VM paused mid-suspend is continued);
   * - running, process gone → failed, with the reason;
   * - suspended → kept, if its state file is there;
   * - starting (a launch cut short) → process killed, directory removed.
   */
  private async adoptAll(): Promise<void> {
    for (const id of await readdir(this.vmsDir)) {
      const dir = join(this.vmsDir, id);
      let record: VmRecord;
      try {
        record = JSON.parse(await readFile(vmFiles(dir).record, "utf8")) as VmRecord;
      } catch {
        await rm(dir, { recursive: true, force: true });
        continue;
      }
      const vm = new MicroVm(dir, record);
      this.uids.add(record.uid);
      const machine = record.pid ? await Machine.attach(dir, record.pid, () => this.releaseJail(vm)) : undefined;
      if (record.pooled) record.status = "starting"; // a warm VM is rebuilt, not adopted
      switch (record.status) {
        case "starting":
          vm.machine = machine;
          await this.destroy(vm);
          continue;
        case "running":
          if (machine) {
            vm.machine = machine;
            // Paused means a suspend was cut short before it was recorded: the
            // guest is intact, so it runs on and the half-written state is dropped.
            if ((await machine.runState()) !== "running") await machine.cont();
            await rm(vmFiles(dir).suspended, { force: true });
            await this.network.adopt(record.network ?? { egress: "none" });
            this.watchExit(vm);
          } else if (await exists(vmFiles(dir).suspended)) {
            vm.record = { ...record, status: "suspended", pid: undefined };
            await this.saveRecord(vm);
            await this.endHostSide(vm);
          } else {
            await this.markFailed(vm, "QEMU process was gone when the server restarted");
            await this.endHostSide(vm);
          }
          break;
        case "paused":
          if (machine) {
            vm.machine = machine;
            this.watchExit(vm);
          } else {
            await this.markFailed(vm, "QEMU process was gone when the server restarted");
            await this.releaseJail(vm);
          }
          break;
        case "suspended":
          await this.endHostSide(vm, machine);
          if (!(await exists(vmFiles(dir).suspended))) await this.markFailed(vm, "suspended state file is missing");
          break;
        case "failed":
          await this.endHostSide(vm, machine);
          break;
        default: {
          const never: never = record.status;
          throw new Error(`unknown VM status ${String(never)}`);
        }
      }
      this.vms.set(id, vm);
      this.config.log?.(`adopted ${id} (${vm.status})`);
    }
  }
}

async function allocateForwards(guestPorts: number[]): Promise<PortForward[]> {
  const forwards: PortForward[] = [];
  for (const guestPort of guestPorts) forwards.push({ guestPort, hostPort: await freeLoopbackPort() });
  return forwards;
}

const newToken = () => randomBytes(24).toString("base64url");

export function newVmId(): string {
  return `vm-${randomBytes(8).toString("hex")}`;
}
