import { EventEmitter } from "node:events";
import { constants, readdirSync } from "node:fs";
import { copyFile, mkdir, open, readdir, readFile, rename, rm, stat, statfs, truncate } from "node:fs/promises";
import { cpus } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { exists, fsyncDir, writeFileAtomic } from "../util/files.ts";
import { KeyedMutex } from "../util/keyed-mutex.ts";
import { isAlive, processArgv, run } from "../util/process.ts";
import { decideAdoption } from "./adoption.ts";
import { AgentClient } from "./agent-client.ts";
import { assertCapturable, captureVm, forkLayers, linkOrCopy, makeChildOverlay, prepareCapture, writeCaptureManifest, type CaptureState, type VmCapture } from "./capture.ts";
import { allocateForwards, HostSide } from "./host.ts";
import type { JailConfig } from "./jail/index.ts";
import { Machine } from "./machine.ts";
import { parseEgress, type Egress } from "./network/index.ts";
import { AGENT_PORT, machinePaths, qemuFeatures, qemuInstall, socketPaths, volumeSerial, type Accelerator, type GuestMemory, type MachineSpec, type PortForward } from "./qemu.ts";
import type { StateLayout } from "./migration.ts";
import { PhaseClock } from "./phases.ts";
import { PrestartPool } from "./prestart-pool.ts";
import { ReleaseStack } from "./release-stack.ts";
import { loadSnapshot, snapshotFiles, type Snapshot } from "./snapshot.ts";
import { Templates, type BootOpts, type GuestBootAssets, type TemplateVm } from "./templates.ts";
import { InvalidVmStateError, SnapshotIncompatibleError, VmNotFoundError } from "../errors.ts";
import { diskBackingOf, MicroVm, newToken, newVmId, vmFiles, type VmRecord, type VmStatus } from "./vm.ts";
import { createVolumeFile, listVolumeIds, removeVolumeFile, volumeFile, type VolumeAttachment } from "./volumes.ts";
import { WarmPool } from "./warm-pool.ts";

export { SNAPSHOT_FORMAT, snapshotDisk, type Snapshot, type SnapshotManifest } from "./snapshot.ts";
export { VOLUME_SLOTS, type DiskChain } from "./qemu.ts";
export type { VolumeAttachment } from "./volumes.ts";
export type { BootOpts, GuestBootAssets, TemplateVm } from "./templates.ts";
export { MicroVm, newVmId, VM_LIMITS, type VmRecord, type VmStatus } from "./vm.ts";

export interface EngineConfig {
  /** Holds `vms/<name>/` (one directory per VM) and `templates/` (records of running templates). */
  dataDir: string;
  assets: GuestBootAssets;
  accelerator: Accelerator;
  /** Watchdog for a cold boot to agent-ready; a boot that misses it is killed and retried once. */
  bootTimeoutMs?: number;
  /** VMs per snapshot kept restored and warm for instant launches (0: none). */
  warmPoolSize?: number;
  /** What runs of launches may grow a snapshot's warm pool to (default the larger of `warmPoolSize` and 8: a burst). */
  warmPoolMax?: number;
  /** QEMU processes kept started and jailed, waiting for a launch's restore (`PrestartPool`; default 0: none). */
  prestartedProcesses?: number;
  /** The QEMU jail; default from the environment (`jailConfigFromEnv`), `false` runs QEMU unjailed. */
  jail?: JailConfig | false;
  log?: (msg: string) => void;
}

/**
 * A console file past this is cut back to nothing (with a note): QEMU appends
 * whatever the guest writes to its serial port, and a guest may write forever.
 */
const CONSOLE_CAP_BYTES = 16 * 2 ** 20;

/**
 * The VMM engine: launch from snapshot, suspend, resume, terminate, and
 * re-adoption of VMs left running by a previous server; cold boots and
 * snapshots through `Templates`, warm VMs through `WarmPool`, host resources
 * through `HostSide`. Operations on one VM are serialized. Emits `phases`
 * (operation, ms per phase: `PhaseClock`) when a launch, a resume or a warm
 * pool's restore ends, and `exit`
 * (vm, reason) when a running VM's QEMU process dies on its own.
 *
 * Every VM holds two release stacks (`MicroVm.host`: its uid and directory;
 * `MicroVm.process`: its QEMU process, jail and network), and every path that
 * ends either (terminate, failure, suspend, pool discard, re-adoption)
 * releases that stack, nothing else.
 */
export class Engine extends EventEmitter {
  /** VMs handed out (running, suspended or failed), by id; pooled VMs are not here. */
  private readonly vms = new Map<string, MicroVm>();
  private readonly locks = new KeyedMutex();
  private readonly vmsDir: string;
  private readonly host: HostSide;
  private readonly templates: Templates;
  private readonly warm: WarmPool;
  private readonly prestarted: PrestartPool;
  private consoleWatch: NodeJS.Timeout | undefined;

  private constructor(private readonly config: EngineConfig) {
    super();
    this.vmsDir = join(config.dataDir, "vms");
    this.host = new HostSide(config.jail, config.log);
    this.templates = new Templates(config, this.host);
    const size = config.warmPoolSize ?? 0;
    // Restores for the pool run one per host CPU: under TCG each keeps a CPU busy.
    const limits = { size, max: config.warmPoolMax ?? Math.max(size, 8), concurrency: cpus().length, shrinkAfterMs: 30_000 };
    this.warm = new WarmPool(limits, {
      restore: async (snapshot) => {
        const clock = new PhaseClock();
        const vm = await this.clone(snapshot, newVmId(), { pooled: true, egress: "none", extraPorts: [], volumes: [] }, clock);
        this.emit("phases", "warm", clock.phases);
        return vm;
      },
      handOut: (vm, id) => this.handOut(vm, id),
      destroy: (vm) => this.destroy(vm),
      log: config.log,
    });
    this.prestarted = new PrestartPool(config.prestartedProcesses ?? 0, {
      start: (snapshot) => this.prestart(snapshot),
      release: (vm) => this.destroy(vm),
      log: config.log,
    });
  }

  get accelerator(): Accelerator {
    return this.config.accelerator;
  }

  /** Absent when QEMU runs unjailed. */
  get jailer() {
    return this.host.jailer;
  }

  /** Opens the engine over a data directory: ends orphaned templates and re-adopts every VM found there. */
  static async open(config: EngineConfig): Promise<Engine> {
    const engine = new Engine(config);
    // Probed here, once per process, rather than on a launch's path (it runs a QEMU for ~0.1 s).
    qemuFeatures();
    await mkdir(engine.vmsDir, { recursive: true, mode: 0o700 });
    await engine.templates.endOrphans();
    await engine.adoptAll();
    engine.consoleWatch = setInterval(() => void engine.capConsoles(), 10_000);
    engine.consoleWatch.unref();
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

  /** The warm pool's and the pre-started QEMU pids (undefined for one under way): they hold host memory though no one has them yet. */
  pooledPids(): (number | undefined)[] {
    return [...this.warm.pids(), ...this.prestarted.pids()];
  }

  /**
   * The file pages VMs map (snapshots' memory files, QEMU's libraries),
   * counted once: their QEMUs share them, so per-process private memory
   * leaves them out. 0 when QEMU runs unjailed (no parent cgroup to read).
   */
  vmsMappedFileMiB(): Promise<number> {
    return this.jailer?.vmsMappedFileMiB() ?? Promise.resolve(0);
  }

  /** Reads a snapshot this host can restore (SnapshotIncompatibleError otherwise). */
  loadSnapshot(dir: string): Promise<Snapshot> {
    return loadSnapshot(dir, { accelerator: this.accelerator });
  }

  // ---- templates (cold boots, image builds) -----------------------------------

  bootTemplate(opts: BootOpts): Promise<TemplateVm> {
    return this.templates.boot(opts);
  }

  snapshot(template: TemplateVm): Promise<Snapshot> {
    return this.templates.snapshot(template);
  }

  discardTemplate(template: TemplateVm): Promise<void> {
    return this.templates.discard(template);
  }

  // ---- VM lifecycle ----------------------------------------------------------

  /**
   * Launches a VM from a snapshot: a QEMU process restores the snapshot's
   * device state over a private copy-on-write mapping of its memory file, with
   * a qcow2 overlay on its disk; then the agent is given new entropy, the time
   * and a secret of its own. Returns once the agent has answered.
   *
   * With a warm pool, the restore has already happened in the background and
   * launching only re-keys a warm VM, handed out under `id` if one is given;
   * with none ready, the launch waits for the pool's next one (`WarmPool`).
   * `guestPorts` adds ports forwarded to host loopback beyond the snapshot's
   * own (forwards and egress are fixed per QEMU process): such a VM, or one
   * with egress, takes the direct path.
   *
   * `diskGiB` larger than the snapshot's disk grows the VM's root disk and
   * filesystem to it once the VM runs (`growDisk`); never shrinks.
   *
   * `volumes` go behind the VM's volume slots, in order (vmm/volumes.ts), and
   * the agent mounts them before the launch returns: such a VM takes the
   * direct path too (a warm VM's slots are empty).
   */
  async launch(snapshot: Snapshot, opts: { id?: string; egress?: Egress; guestPorts?: number[]; diskGiB?: number; volumes?: VolumeAttachment[] } = {}): Promise<MicroVm> {
    const m = snapshot.manifest;
    // Validates the policy before anything starts. Warm VMs have egress "none".
    const egress = parseEgress(opts.egress ?? "none");
    const extraPorts = (opts.guestPorts ?? []).filter((p) => !m.guestPorts.includes(p));
    if (opts.id && this.vms.has(opts.id)) throw new Error(`microVM ${opts.id} exists already`);
    const clock = new PhaseClock();
    const volumes = opts.volumes ?? [];
    const warm = egress !== "none" || extraPorts.length > 0 || volumes.length > 0 ? undefined : await this.warm.take(snapshot, opts.id);
    if (warm) clock.mark("hand-out");
    void this.warm.fill(snapshot);
    const vm = warm ?? (await this.clone(snapshot, opts.id ?? newVmId(), { pooled: false, egress, extraPorts, volumes }, clock));
    this.emit("phases", "launch", clock.phases);
    if (opts.diskGiB !== undefined) {
      await this.growDisk(vm, opts.diskGiB).catch(async (err: unknown) => {
        await this.withVm(vm.id, (v) => this.destroy(v));
        throw err;
      });
    }
    return vm;
  }

  /**
   * Grows a running VM's root disk to `diskGiB` if it is smaller: the qcow2
   * overlay's virtual size through QMP `block_resize` (the guest kernel sees
   * the virtio config change), then the ext4 inside, online, by the agent.
   * The size is the record's, never read from the disk the VM writes.
   */
  private growDisk(vm: MicroVm, diskGiB: number): Promise<void> {
    const bytes = diskGiB * 2 ** 30;
    return this.withVm(vm.id, async (v) => {
      if (!v.machine || v.status !== "running") throw new InvalidVmStateError(v.id, v.status, "grow the disk of");
      if (v.record.diskBytes >= bytes) return;
      await v.machine.resizeDisk(bytes);
      v.record = { ...v.record, diskBytes: bytes };
      await this.saveRecord(v);
      await v.agent.growDisk(bytes);
    });
  }

  /** Fills the snapshot's warm pool; resolves when it is full. */
  prewarm(snapshot: Snapshot): Promise<void> {
    return this.warm.fill(snapshot);
  }

  /** Ends the warm VMs and pre-started processes of a snapshot (its image is being deleted); later launches of it would fail anyway. */
  async dropWarm(snapshotDir: string): Promise<void> {
    await this.warm.drop(snapshotDir);
    await this.prestarted.drop(snapshotDir);
  }

  /**
   * Suspends a running (or paused) VM to disk: pauses it, writes its memory
   * and device state to its directory, and ends the QEMU process (no CPU, no
   * RAM held). The VM is recorded as suspended only once the state file is
   * durable, and the process ends only after that.
   */
  suspend(id: string): Promise<MicroVm> {
    return this.withVm(id, async (vm) => {
      const machine = vm.machine;
      if ((vm.status !== "running" && vm.status !== "paused") || !machine) throw new InvalidVmStateError(id, vm.status, "suspend");
      const files = vmFiles(vm.dir);
      machine.removeAllListeners("exit");
      try {
        await machine.save(files.suspending);
      } catch (err) {
        // The guest is intact in the stopped process: let it go on as it was.
        if (vm.status === "running") await machine.cont().catch(() => undefined);
        this.watchExit(vm, machine);
        await rm(files.suspending, { force: true });
        throw err;
      }
      await rename(files.suspending, files.suspended);
      await fsyncDir(vm.dir);
      vm.record = { ...vm.record, status: "suspended", pid: undefined };
      await this.saveRecord(vm);
      vm.agent.close();
      await this.releaseProcess(vm);
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
    return this.withVm(id, async (vm) => {
      const from: VmStatus = paused ? "running" : "paused";
      if (vm.status !== from || !vm.machine) throw new InvalidVmStateError(id, vm.status, paused ? "pause" : "unpause");
      await (paused ? vm.machine.pause() : vm.machine.cont());
      vm.record = { ...vm.record, status: paused ? "paused" : "running" };
      await this.saveRecord(vm);
      return vm;
    });
  }

  /** Resumes a suspended VM exactly where it was paused, with a new agent secret. */
  resume(id: string): Promise<MicroVm> {
    return this.withVm(id, async (vm) => {
      if (vm.status !== "suspended") throw new InvalidVmStateError(id, vm.status, "resume");
      const files = vmFiles(vm.dir);
      // Fresh host ports: the old ones were released with the old process.
      const forwards = await allocateForwards([AGENT_PORT, ...vm.record.forwards.map((f) => f.guestPort)]);
      vm.record = { ...vm.record, agentPort: forwards[0]!.hostPort, forwards: forwards.slice(1) };
      const clock = new PhaseClock();
      await this.restoreInto(vm, { kind: "anonymous" }, files.suspended, clock, { sameMachine: true }).catch((err: unknown) => {
        // Its saved state is its snapshot's machine's (a QEMU or Cocoon upgrade since): no rebuild brings it back.
        if (!(err instanceof SnapshotIncompatibleError)) throw err;
        if (err.differs === "format") {
          throw new SnapshotIncompatibleError(
            `microVM ${id} was suspended by an older Cocoon whose machine layout this server no longer restores (${err.reason})`,
            "terminate it, or resume it with the Cocoon version that suspended it",
            "format",
          );
        }
        throw new SnapshotIncompatibleError(
          `microVM ${id} was suspended by a QEMU build this host no longer runs, which alone can restore its saved state (${err.reason})`,
          "terminate it, or resume it on a host running the build that suspended it",
          err.differs,
        );
      });
      this.emit("phases", "resume", clock.phases);
      // Only now: until the record said running, a restart kept the VM suspended.
      await rm(files.suspended, { force: true });
      return vm;
    });
  }

  // ---- volumes (volumes.ts) ----------------------------------------------------

  /** Makes the file of a new volume (an empty ext4 of `sizeGiB`). */
  createVolume(volumeId: string, sizeGiB: number): Promise<void> {
    return createVolumeFile(this.config.dataDir, volumeId, sizeGiB);
  }

  /** The ids of the volume files on this host. */
  volumeIds(): Promise<string[]> {
    return listVolumeIds(this.config.dataDir);
  }

  /** Removes a volume's file; the caller made sure no VM has it. */
  deleteVolume(volumeId: string): Promise<void> {
    return removeVolumeFile(this.config.dataDir, volumeId);
  }

  // ---- suspended VMs moving between nodes (docs/cluster.md) ------------------------

  /**
   * The files a suspended VM consists of, for another node to resume it
   * from: its device state and RAM, its disk overlay, and the overlay's
   * backing chain (read-only layers, nearest first). They stay as they are
   * while it is suspended; the caller reads them before any resume (the
   * lifecycle holds the VM's lock).
   */
  suspendedFiles(id: string): Promise<{ state: string; disk: string; backing: string[]; guestPorts: number[]; diskBytes: number; token: string }> {
    return this.withVm(id, async (vm) => {
      if (vm.status !== "suspended") throw new InvalidVmStateError(id, vm.status, "export");
      const files = vmFiles(vm.dir);
      const snapshot = await this.loadSnapshot(vm.record.snapshotDir);
      return {
        state: files.suspended,
        disk: files.disk,
        backing: diskBackingOf(vm.record, snapshot),
        guestPorts: vm.record.forwards.map((f) => f.guestPort),
        diskBytes: vm.record.diskBytes,
        token: vm.record.token,
      };
    });
  }

  /**
   * Takes in a VM suspended on another node: `fetch` fills a staging
   * directory with `state` and `disk` (verified by the caller) and returns
   * the local paths of the disk's backing layers, nearest first (read-only,
   * root's: hard-linked into the VM's directory), and the VM's shape, secret,
   * guest ports and egress. The VM is recorded suspended, its layers its
   * whole chain; `snapshot` (a local one) gives only the kernel, initramfs
   * and command line QEMU starts with. Resume it with `resume`.
   */
  async importSuspended(
    id: string,
    snapshot: Snapshot,
    fetch: (stagingDir: string) => Promise<{ layers: string[]; vcpus: number; memoryMiB: number; diskBytes: number; token: string; guestPorts: number[]; egress: Egress }>,
  ): Promise<MicroVm> {
    if (this.vms.has(id)) throw new Error(`microVM ${id} exists already`);
    // Under vms/ (renames stay on one filesystem); without a record, a restart removes it.
    const staging = join(this.vmsDir, `.import-${randomBytes(6).toString("hex")}`);
    await mkdir(staging, { mode: 0o700 });
    try {
      const { layers, ...from } = await fetch(staging);
      const vm = await this.newVm(id, { snapshotDir: snapshot.dir, vcpus: from.vcpus, memoryMiB: from.memoryMiB, diskBytes: from.diskBytes, token: from.token }, from.guestPorts, from.egress);
      this.vms.set(id, vm);
      return await this.locks.run(id, async () => {
        try {
          // Status starting until the files are in place: a crash before leaves a record adoption discards.
          await this.saveRecord(vm);
          const own: string[] = [];
          for (const [i, layer] of layers.entries()) {
            own.push(join(vm.dir, `layer-${i}.qcow2`));
            await linkOrCopy(layer, own[i]!);
          }
          const files = vmFiles(vm.dir);
          await rename(join(staging, "state"), files.suspended);
          await rename(join(staging, "disk"), files.disk);
          await this.host.prepareFiles(vm.record.uid, [files.disk]);
          await fsyncDir(vm.dir);
          vm.record = { ...vm.record, status: "suspended", diskLayers: own, diskLayersComplete: true };
          await this.saveRecord(vm);
          return vm;
        } catch (err) {
          await this.destroy(vm).catch((e: Error) => this.config.log?.(`cleaning up after a failed import of ${id}: ${e.message}`));
          throw err;
        }
      });
    } finally {
      await rm(staging, { recursive: true, force: true });
    }
  }

  // ---- named snapshots and forks of a running VM (capture.ts) -------------------

  /**
   * Snapshots a running VM into `dir` (which becomes a snapshot directory,
   * launchable like an image's) while it keeps running; `pauseMs` is how
   * long its vCPUs were stopped.
   */
  async snapshotRunning(id: string, dir: string): Promise<{ snapshot: Snapshot; pauseMs: number }> {
    return this.withVm(id, async (vm) => {
      const capture = await captureVm(vm, dir, { durable: true });
      const snapshot = await writeCaptureManifest(capture, vm, await this.loadSnapshot(vm.record.snapshotDir));
      return { snapshot, pauseMs: capture.pauseMs };
    });
  }

  /**
   * Forks a running VM into new VMs under `childIds`: each restores the
   * parent's memory and devices of one instant, over disk layers shared
   * read-only with its siblings and a copy-on-write overlay of its own, then
   * gets a secret, hostname, machine-id, entropy and clock of its own (the
   * agent's re-key). The parent runs on. One child's failure fails only it.
   *
   * The children's processes start while the parent is captured (in the
   * background, yielding to it): each holds the capture's state and disk
   * layer from before they are written (`prepareCapture`), and binds the
   * layer under its disk once the capture ends (`DiskChain.backingLater`),
   * so only the restore and the re-key follow the capture.
   */
  async fork(id: string, childIds: string[]): Promise<{ pauseMs: number; children: (MicroVm | Error)[] }> {
    for (const childId of childIds) if (this.vms.has(childId)) throw new Error(`microVM ${childId} exists already`);
    const parent = this.get(id);
    assertCapturable(parent);
    // Under vms/ (so a link to its layers stays on one filesystem); without a record, a restart removes it.
    const tag = randomBytes(6).toString("hex");
    const dir = join(this.vmsDir, `.fork-${tag}`);
    const total = new PhaseClock();
    const state = await this.forkState(parent, dir, tag);
    // Made beside the capture; awaited by every child (each fails with its error) and before the directory goes.
    const childDisk = makeChildOverlay(dir, parent.record.diskBytes);
    childDisk.catch(() => undefined);
    const captureClock = new PhaseClock();
    const capturing = this.withVm(id, (vm) => captureVm(vm, dir, { durable: false, clock: captureClock, state }));
    // Each child fails on its own (with the capture's error if it failed); awaited below either way.
    const children = Promise.all(childIds.map((childId) => this.forkChild(parent.record, dir, state, childDisk, capturing, childId).catch((err: Error) => err)));
    try {
      const capture = await capturing;
      this.emit("phases", "capture", captureClock.phases);
      total.mark("capture");
      const done = await children;
      total.mark("children");
      return { pauseMs: capture.pauseMs, children: done };
    } finally {
      // A failed capture's children are ended before its files go.
      await children;
      await childDisk.catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
      await rm(state.path, { force: true });
      total.mark("cleanup");
      this.emit("phases", "fork", total.phases);
    }
  }

  /**
   * Prepares a fork's capture (`prepareCapture`) and says where its state
   * goes: in the mapped-ram layout where both the parent's QEMU and this
   * host's (the children's) have it, which the parent's QEMU writes itself,
   * so into its socket directory (the one place its jail lets it open a file
   * the server made its own; removed with the fork, or with the directory),
   * if that filesystem (a tmpfs, usually) has room for all of the VM's RAM;
   * else a stream into the capture directory.
   */
  private async forkState(parent: MicroVm, dir: string, tag: string): Promise<CaptureState> {
    const sockets = socketPaths(parent.record.processName).dir;
    const room = await statfs(sockets).then((s) => s.bavail * s.bsize, () => 0);
    const mappedRam =
      qemuFeatures().fileMigration && room > (parent.record.memoryMiB + 64) * 2 ** 20 && ((await parent.machine?.hasMappedRam().catch(() => false)) ?? false);
    const state: CaptureState = mappedRam ? { path: join(sockets, `capture-${tag}.ram`), layout: "mapped-ram" } : { path: snapshotFiles(dir).state, layout: "stream" };
    try {
      await prepareCapture(dir, state);
      if (mappedRam) await this.host.prepareFiles(parent.record.uid, [state.path]);
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      await rm(state.path, { force: true });
      throw err;
    }
    return state;
  }

  /** Removes the fork captures' states left in a process's socket directory by a server that died mid-fork (`forkState`). */
  private async removeForkStates(processName: string): Promise<void> {
    const dir = socketPaths(processName).dir;
    for (const name of await readdir(dir).catch(() => [])) if (/^capture-[0-9a-f]+\.ram$/.test(name)) await rm(join(dir, name), { force: true });
  }

  /**
   * One child of a fork: the parent's shape, ports and egress; its process
   * started at once, its disk's chain bound and the capture restored into
   * anonymous memory (as a resume) once `capturing` ends.
   */
  private async forkChild(parent: VmRecord, dir: string, state: CaptureState, childDisk: Promise<string>, capturing: Promise<VmCapture>, id: string): Promise<MicroVm> {
    const clock = new PhaseClock();
    const vm = await this.newVm(
      id,
      { snapshotDir: parent.snapshotDir, vcpus: parent.vcpus, memoryMiB: parent.memoryMiB, diskBytes: parent.diskBytes, token: parent.token },
      parent.forwards.map((f) => f.guestPort),
      parent.network.egress,
    );
    this.vms.set(id, vm);
    clock.mark("host");
    return this.locks.run(id, async () => {
      try {
        // Before anything runs: a crash from here leaves a record adoption discards (status starting).
        await this.saveRecord(vm);
        const layers = await forkLayers(dir, parent, vm.dir);
        // A parent moved from another node has no snapshot disk under its layers: nor have its children.
        vm.record = { ...vm.record, diskLayers: layers, diskLayersComplete: parent.diskLayersComplete };
        await this.saveRecord(vm);
        clock.mark("layers");
        const disk = vmFiles(vm.dir).disk;
        await copyFile(await childDisk, disk);
        await this.host.prepareFiles(vm.record.uid, [disk]);
        clock.mark("overlay");
        const forwards = [{ hostPort: vm.record.agentPort, guestPort: AGENT_PORT }, ...vm.record.forwards];
        let started = false;
        const starting = this.startRestoreProcess(vm, { kind: "anonymous" }, state.path, forwards, clock, { background: true, backingLater: true, layout: state.layout });
        void starting.then(() => (started = true), () => undefined);
        // Whatever the capture's end, the start is awaited before anything is released.
        const captured = await capturing.then((capture) => ({ capture }), (error: unknown) => ({ error }));
        clock.mark("capture");
        // A start still under way no longer yields to anything (restoreInto sets the share again once it has started).
        if (!started) await this.host.foreground(vm.record.processName, vm.record.vcpus).catch(() => undefined);
        await starting;
        clock.mark("started");
        if ("error" in captured) throw captured.error;
        const capture = captured.capture;
        vm.record = { ...vm.record, token: capture.token };
        await this.restoreInto(vm, { kind: "anonymous" }, capture.state, clock);
        this.emit("phases", "fork-child", clock.phases);
        return vm;
      } catch (err) {
        await this.destroy(vm).catch((e: Error) => this.config.log?.(`cleaning up after a failed fork into ${id}: ${e.message}`));
        throw err;
      }
    });
  }

  /** Ends a VM: its process is gone, its directory removed and everything it held released. */
  terminate(id: string): Promise<void> {
    return this.withVm(id, (vm) => this.destroy(vm));
  }

  /**
   * Runs `fn` on the VM under its lock. Locks are keyed by the process name,
   * which a VM keeps for life (its id may be given later, see `handOut`).
   */
  private async withVm<T>(id: string, fn: (vm: MicroVm) => Promise<T>): Promise<T> {
    return this.locks.run(this.get(id).record.processName, () => fn(this.get(id)));
  }

  /**
   * Stops the warm pools and detaches from every VM without stopping it
   * (server shutdown or restart): the next engine re-adopts them.
   */
  async close(): Promise<void> {
    clearInterval(this.consoleWatch);
    this.jailer?.close();
    await this.warm.close();
    await this.prestarted.close();
    for (const vm of this.vms.values()) {
      vm.machine?.removeAllListeners("exit");
      vm.machine?.detach();
      vm.agent.close();
      this.host.network.detach(vm.record.network);
    }
    this.vms.clear();
  }

  // ---- internals ---------------------------------------------------------------

  /**
   * A new VM's host side before its process: its directory (released with its
   * host stack), host ports for the agent and `guestPorts`, a uid and a
   * network of its own. Launches and fork children both start here.
   */
  private async newVm(
    id: string,
    from: Pick<VmRecord, "snapshotDir" | "vcpus" | "memoryMiB" | "diskBytes" | "token" | "pooled" | "volumes">,
    guestPorts: number[],
    egress: Egress,
  ): Promise<MicroVm> {
    const dir = join(this.vmsDir, id);
    await mkdir(dir, { mode: 0o700 });
    const forwards = await allocateForwards([AGENT_PORT, ...guestPorts]);
    const record: VmRecord = {
      id,
      processName: id,
      status: "starting",
      ...from,
      uid: 0,
      agentPort: forwards[0]!.hostPort,
      forwards: forwards.slice(1),
      network: { egress: "none" },
      createdAt: new Date().toISOString(),
    };
    const vm = new MicroVm(dir, record);
    vm.host.push("directory", () => rm(vm.dir, { recursive: true, force: true }));
    const uid = this.host.allocateUid(vm.host);
    vm.record = { ...record, uid, network: this.host.network.allocate(egress, uid) };
    return vm;
  }

  /**
   * Restores a new VM from a snapshot (the direct launch path, and the warm
   * pool's), in a pre-started process of the snapshot where there is one.
   * Its directory is named after its process, which keeps its name if a
   * pooled VM or a pre-started process is later handed out under another id.
   */
  private async clone(
    snapshot: Snapshot,
    id: string,
    opts: { pooled: boolean; egress: Egress; extraPorts: number[]; volumes: VolumeAttachment[] },
    clock: PhaseClock,
  ): Promise<MicroVm> {
    const m = snapshot.manifest;
    const volumes = opts.volumes.length > 0 ? opts.volumes : undefined;
    // A pre-started process has user-mode networking and empty volume slots, bound when it started.
    const generic = opts.egress === "none" && !volumes;
    const prestarted = generic ? this.prestarted.take(snapshot) : undefined;
    const guestPorts = [...m.guestPorts, ...opts.extraPorts];
    let vm: MicroVm;
    if (prestarted) {
      vm = prestarted;
      // Its ports only now: the process has none yet (`Machine.addForwards` in restoreInto).
      const forwards = await allocateForwards([AGENT_PORT, ...guestPorts]);
      vm.record = { ...vm.record, id, pooled: opts.pooled || undefined, agentPort: forwards[0]!.hostPort, forwards: forwards.slice(1), createdAt: new Date().toISOString() };
      clock.mark("take");
    } else {
      vm = await this.newVm(
        id,
        { snapshotDir: snapshot.dir, vcpus: m.vcpus, memoryMiB: m.memoryMiB, diskBytes: m.diskBytes, token: m.token, pooled: opts.pooled || undefined, volumes },
        guestPorts,
        opts.egress,
      );
    }
    if (!opts.pooled) this.vms.set(id, vm);
    return this.locks.run(vm.record.processName, async () => {
      try {
        // Recorded before QEMU starts, so a crash mid-launch leaves a record that
        // adoption cleans up instead of an untracked process.
        await this.saveRecord(vm);
        if (!prestarted) {
          await this.createCloneDisk(vm, snapshot);
          clock.mark("prepare");
        }
        await this.restoreInto(vm, cloneMemory(snapshot), snapshotFiles(snapshot.dir).state, clock);
        if (volumes) {
          await vm.agent.mountVolumes(volumes.map((v, slot) => ({ serial: volumeSerial(slot), path: v.path, readOnly: v.readOnly })));
          clock.mark("volumes");
        }
        return vm;
      } catch (err) {
        await this.destroy(vm).catch((e: Error) => this.config.log?.(`cleaning up after a failed launch of ${id}: ${e.message}`));
        throw err;
      } finally {
        // The next launch of the snapshot finds a process again (and a run of them, more).
        if (generic) this.prestarted.replenish(snapshot);
      }
    });
  }

  /** A clone's disk: a qcow2 overlay on the snapshot's, its uid's alone. */
  private async createCloneDisk(vm: MicroVm, snapshot: Snapshot): Promise<void> {
    const disk = vmFiles(vm.dir).disk;
    // -u: the snapshot's disk is not opened (its size is in the manifest), so no header is followed.
    await run(qemuInstall().img, ["create", "-q", "-f", "qcow2", "-u", "-b", snapshotFiles(snapshot.dir).disk, "-F", "qcow2", disk, String(snapshot.manifest.diskBytes)]);
    await this.host.prepareFiles(vm.record.uid, [disk]);
  }

  /**
   * A QEMU process for a clone of the snapshot, started ahead of any launch
   * (`PrestartPool`): everything a direct launch does before the restore
   * (directory, uid, disk overlay, jail, spawn, QMP), minus the port
   * forwards, which a launch binds when it takes it. It is a VM recorded
   * `pooled` and `starting`, so a restart discards it (`decideAdoption`),
   * and every release goes through its stacks as any VM's.
   */
  private async prestart(snapshot: Snapshot): Promise<MicroVm> {
    const m = snapshot.manifest;
    const clock = new PhaseClock();
    const vm = await this.newVm(
      newVmId(),
      { snapshotDir: snapshot.dir, vcpus: m.vcpus, memoryMiB: m.memoryMiB, diskBytes: m.diskBytes, token: m.token, pooled: true },
      [],
      "none",
    );
    return this.locks.run(vm.record.processName, async () => {
      try {
        await this.saveRecord(vm);
        await this.createCloneDisk(vm, snapshot);
        clock.mark("prepare");
        // In the background: its start yields to the running VMs (the launch that took the last one).
        const machine = await this.startRestoreProcess(vm, cloneMemory(snapshot), snapshotFiles(snapshot.dir).state, [], clock, { background: true });
        vm.record = { ...vm.record, pid: machine.pid };
        await this.saveRecord(vm);
        // While it waits in the pool; a launch that takes it replaces this (restoreInto).
        machine.once("exit", () => {
          void this.locks.run(vm.record.processName, async () => {
            if (vm.machine === machine && this.prestarted.remove(vm)) await this.destroy(vm);
          });
        });
        this.emit("phases", "prestart", clock.phases);
        return vm;
      } catch (err) {
        await this.destroy(vm).catch((e: Error) => this.config.log?.(`cleaning up after a failed pre-start of ${vm.id}: ${e.message}`));
        throw err;
      }
    });
  }

  /** Makes a pooled VM the caller's: a secret and a hostname of its own, recorded under `id`. */
  private handOut(vm: MicroVm, id: string | undefined): Promise<MicroVm> {
    return this.locks.run(vm.record.processName, async () => {
      const newId = id ?? vm.id;
      const token = newToken();
      await vm.agent.restore({ newToken: token, hostname: newId });
      vm.record = { ...vm.record, id: newId, token, pooled: undefined, createdAt: new Date().toISOString() };
      await this.saveRecord(vm);
      this.vms.set(newId, vm);
      return vm;
    });
  }

  /**
   * Starts a QEMU process that restores `stateFile` over `memory`, continues
   * it, and gives the guest a new secret (the one it holds is `record.token`:
   * the snapshot's, or the one it had when it was suspended). Recorded as
   * running, with the new secret, only once all of that has worked; on any
   * failure the process and everything it held are released. A VM that has
   * a process already was given one started ahead for this restore (`prestart`,
   * a fork child: `forkChild`), with the same `memory` and `stateFile`.
   * A resume is the same machine (`sameMachine`: its machine-id is kept); a
   * launch or fork child is a new one.
   */
  private async restoreInto(vm: MicroVm, memory: GuestMemory, stateFile: string, clock: PhaseClock, opts: { sameMachine?: boolean } = {}): Promise<void> {
    const token = newToken();
    const forwards = [{ hostPort: vm.record.agentPort, guestPort: AGENT_PORT }, ...vm.record.forwards];
    try {
      let machine = vm.machine;
      if (machine) {
        // Started ahead for this restore (`prestart`, a fork child): its CPU share, the forwards it lacks and a fork child's disk chain are bound now.
        machine.removeAllListeners("exit");
        await this.host.foreground(machine.name, vm.record.vcpus);
        await machine.addForwards(forwards.filter((f) => !machine!.forwards.some((has) => has.hostPort === f.hostPort && has.guestPort === f.guestPort)));
        clock.mark("forwards");
        if (machine.backingUnbound) {
          await machine.bindBacking();
          clock.mark("backing");
        }
      } else machine = await this.startRestoreProcess(vm, memory, stateFile, forwards, clock);
      await machine.restore();
      clock.mark("restore");
      await machine.cont();
      clock.mark("cont");
      vm.agent.close();
      vm.agent = new AgentClient(vm.record.agentPort, vm.record.token);
      await vm.agent.restore({ newToken: token, hostname: vm.id, sameMachine: opts.sameMachine });
      clock.mark("re-key");
      vm.record = { ...vm.record, status: "running", pid: machine.pid, token };
      await this.saveRecord(vm);
      clock.mark("record");
      this.watchExit(vm, machine);
    } catch (err) {
      await this.releaseProcess(vm).catch((e: Error) => this.config.log?.(`releasing ${vm.id}'s process after a failed restore: ${e.message}`));
      throw err;
    }
  }

  /**
   * Starts the QEMU process that will restore `stateFile` over `memory`
   * into `vm` (jailed, QMP connected, waiting: `-incoming defer`), with
   * `forwards` bound; its releases on a new `vm.process`.
   */
  private async startRestoreProcess(
    vm: MicroVm,
    memory: GuestMemory,
    stateFile: string,
    forwards: PortForward[],
    clock: PhaseClock,
    opts: { background?: boolean; backingLater?: boolean; layout?: StateLayout } = {},
  ): Promise<Machine> {
    const snapshot = await this.loadSnapshot(vm.record.snapshotDir);
    const spec: MachineSpec = {
      vmDir: vm.dir,
      name: vm.record.processName,
      accelerator: this.accelerator,
      vcpus: vm.record.vcpus,
      memoryMiB: vm.record.memoryMiB,
      memory,
      kernel: snapshot.manifest.kernel,
      initramfs: snapshot.manifest.initramfs,
      cmdline: snapshot.manifest.cmdline,
      disk: { path: vmFiles(vm.dir).disk, backing: diskBackingOf(vm.record, snapshot), backingLater: opts.backingLater },
      volumes: (vm.record.volumes ?? []).map((v) => ({ path: volumeFile(this.config.dataDir, v.volumeId), readOnly: v.readOnly })),
      forwards,
      incomingState: stateFile,
      incomingLayout: opts.layout,
    };
    vm.process = new ReleaseStack();
    await this.host.prepareVolumes(vm.record.uid, spec.volumes ?? []);
    vm.machine = await this.host.startProcess(spec, vm.record.network, vm.record.uid, vm.process, clock, { background: opts.background });
    return vm.machine;
  }

  /** Ends the VM's QEMU process and what it held (jail, network); the VM itself stays. */
  private async releaseProcess(vm: MicroVm): Promise<void> {
    const process = vm.process;
    vm.process = undefined;
    vm.machine = undefined;
    await process?.release();
  }

  /** Ends everything the VM holds, its directory included, and forgets it. */
  private async destroy(vm: MicroVm): Promise<void> {
    vm.machine?.removeAllListeners("exit");
    vm.agent.close();
    if (this.vms.get(vm.id) === vm) this.vms.delete(vm.id);
    try {
      await this.releaseProcess(vm);
    } finally {
      await vm.host.release();
    }
  }

  private watchExit(vm: MicroVm, machine: Machine): void {
    machine.once("exit", () => {
      void this.locks.run(vm.record.processName, async () => {
        if (vm.machine !== machine) return;
        if (vm.record.pooled) {
          this.warm.remove(vm);
          await this.destroy(vm);
          return;
        }
        if (vm.status !== "running" && vm.status !== "paused") return;
        vm.agent.close();
        const cause = await this.jailer?.exitCause(vm.record.processName);
        await this.releaseProcess(vm).catch((e: Error) => this.config.log?.(`releasing ${vm.id} after its QEMU exited: ${e.message}`));
        const console = await readConsoleTail(vm.dir, 300);
        await this.markFailed(vm, `QEMU process exited unexpectedly${cause ? ` (${cause})` : ""}${console ? `; console: ${console}` : ""}`);
        this.emit("exit", vm, vm.record.failureReason);
      }).catch((err: Error) => this.config.log?.(`handling the exit of ${vm.id}: ${err.message}`));
    });
  }

  private async markFailed(vm: MicroVm, reason: string): Promise<void> {
    vm.record = { ...vm.record, status: "failed", failureReason: reason, pid: undefined };
    await this.saveRecord(vm);
  }

  private saveRecord(vm: MicroVm): Promise<void> {
    return writeFileAtomic(vmFiles(vm.dir).record, JSON.stringify(vm.record, null, 2), 0o600);
  }

  /** Cuts back console files that grew past their cap (see CONSOLE_CAP_BYTES). */
  private async capConsoles(): Promise<void> {
    for (const vm of this.vms.values()) {
      const path = machinePaths(vm.dir).console;
      const size = await stat(path).then((s) => s.size, () => 0);
      if (size <= CONSOLE_CAP_BYTES) continue;
      // QEMU appends (O_APPEND), so after truncation it writes at the new end.
      await truncate(path, 0).catch(() => undefined);
      this.config.log?.(`console of ${vm.id} passed ${CONSOLE_CAP_BYTES} bytes: cut back`);
    }
  }

  /**
   * Rebuilds the VM table from `vms/*\/vm.json` after a (re)start. What to do
   * with each VM is `decideAdoption`'s answer to the facts gathered here; a VM
   * whose adoption fails is recorded failed and the others go on.
   */
  private async adoptAll(): Promise<void> {
    const qemus = qemuPidsByName();
    for (const name of await readdir(this.vmsDir)) {
      const dir = join(this.vmsDir, name);
      const record = await readFile(vmFiles(dir).record, "utf8").then((t) => JSON.parse(t) as VmRecord, () => undefined);
      if (!record) {
        // No record: the server died before writing it, so before starting anything.
        await rm(dir, { recursive: true, force: true });
        continue;
      }
      const vm = new MicroVm(dir, record);
      try {
        await this.adopt(vm, qemus.get(record.processName) ?? 0);
      } catch (err) {
        this.config.log?.(`adopting ${record.id}: ${(err as Error).message}`);
        await this.markFailed(vm, `could not be re-adopted after a restart: ${(err as Error).message}`).catch(() => undefined);
        this.vms.set(vm.id, vm);
      }
    }
  }

  /** Acts on `decideAdoption` for one VM; `runningPid` is its QEMU found in /proc (0: none). */
  private async adopt(vm: MicroVm, runningPid: number): Promise<void> {
    const { record, dir } = vm;
    vm.host.push("directory", () => rm(vm.dir, { recursive: true, force: true }));
    this.host.holdUid(record.uid, vm.host);
    const machine = record.pid ? await Machine.attach(record.processName, record.pid, this.jailer ? record.uid : undefined) : undefined;
    const files = vmFiles(dir);
    const decision = decideAdoption({
      status: record.status,
      pooled: record.pooled === true,
      processAlive: machine !== undefined,
      processPaused: machine ? (await machine.runState()) !== "running" : false,
      savedState: await exists(files.suspended),
    });
    vm.process = new ReleaseStack();
    this.host.adoptProcess({ name: record.processName, vmDir: dir, network: record.network, pid: machine?.pid ?? runningPid }, vm.process, machine);
    vm.machine = machine;
    switch (decision.action) {
      case "discard":
        await this.destroy(vm);
        this.config.log?.(`discarded ${record.id} (${record.pooled ? "warm pool" : "launch cut short"})`);
        return;
      case "attach":
        await machine!.cancelMigration();
        await this.removeForkStates(record.processName);
        if (decision.cont) await machine!.cont();
        await rm(files.suspended, { force: true });
        await rm(files.suspending, { force: true });
        await this.host.network.adopt(record.network);
        this.watchExit(vm, machine!);
        break;
      case "suspend":
        await this.releaseProcess(vm);
        await rm(files.suspending, { force: true });
        if (record.status !== "suspended") {
          vm.record = { ...record, status: "suspended", pid: undefined };
          await this.saveRecord(vm);
        }
        break;
      case "fail":
        await this.releaseProcess(vm);
        await this.markFailed(vm, decision.reason);
        break;
      case "keep-failed":
        await this.releaseProcess(vm);
        break;
      default: {
        const never: never = decision;
        throw new Error(`unknown adoption ${JSON.stringify(never)}`);
      }
    }
    this.vms.set(vm.id, vm);
    this.config.log?.(`adopted ${vm.id} (${vm.status})`);
  }
}

/** Where a clone's RAM comes from: the snapshot's memory file, mapped copy-on-write, or (a snapshot of a running VM, capture.ts) its state, as a resume. */
function cloneMemory(snapshot: Snapshot): GuestMemory {
  return snapshot.manifest.ramInState ? { kind: "anonymous" } : { kind: "file", path: snapshotFiles(snapshot.dir).memory, shared: false };
}

/** Running QEMU processes by their `-name` (one scan of /proc, at adoption). */
function qemuPidsByName(): Map<string, number> {
  const byName = new Map<string, number>();
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const argv = processArgv(Number(entry));
    const at = argv?.indexOf("-name") ?? -1;
    if (!argv || at < 0 || !argv[0]?.endsWith("qemu-system-x86_64") || !isAlive(Number(entry))) continue;
    byName.set(argv[at + 1]!.split(",")[0]!, Number(entry));
  }
  return byName;
}

/** The last `bytes` of a VM's console, read without loading the whole file (root-owned: QEMU writes it through a descriptor). */
export async function readConsoleTail(vmDir: string, bytes: number): Promise<string> {
  const file = await open(machinePaths(vmDir).console, constants.O_RDONLY | constants.O_NOFOLLOW).catch(() => undefined);
  if (!file) return "";
  try {
    const { size } = await file.stat();
    const buf = Buffer.alloc(Math.min(bytes, size));
    await file.read(buf, 0, buf.length, size - buf.length);
    return buf.toString("utf8").trim();
  } finally {
    await file.close();
  }
}
