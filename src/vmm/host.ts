import { randomInt } from "node:crypto";
import { chmod, chown, mkdir, rm } from "node:fs/promises";
import { dirname } from "node:path";
import { jailConfigFromEnv, Jailer, vmUidRange, type JailConfig } from "./jail/index.ts";
import { killQemuNamed, Machine } from "./machine.ts";
import { NetworkManager, type VmNetworkRecord } from "./network/index.ts";
import { qemuOverheadMiB, readOnlyMemoryFile, socketPaths, type MachineSpec, type VolumeDisk } from "./qemu.ts";
import { freeLoopbackPort } from "../util/ports.ts";
import type { PhaseClock } from "./phases.ts";
import type { ReleaseStack } from "./release-stack.ts";
import type { PortForward } from "./qemu.ts";

/** A QEMU process as the host knows it: enough to end it and what it holds, whether or not this server started it. */
export interface ProcessIdentity {
  /** `MachineSpec.name`: QEMU's `-name` and the jail's cgroup. */
  name: string;
  vmDir: string;
  network: VmNetworkRecord;
  /** Its host pid, if it was recorded. */
  pid?: number;
}

/**
 * The host resources of VMs and templates: uids, each QEMU process's
 * network, jail and process. Everything is acquired here and released
 * through the owner's `ReleaseStack`, by the same steps whether the process
 * was started by this server or found after a restart.
 */
export class HostSide {
  readonly network: NetworkManager;
  /** Absent when QEMU runs unjailed. */
  readonly jailer: Jailer | undefined;
  /** uids held by VMs, pooled VMs and templates of this server. */
  private readonly uids = new Set<number>();

  constructor(jail: JailConfig | false | undefined, log?: (msg: string) => void) {
    this.network = new NetworkManager(log);
    const config = jail === false ? undefined : (jail ?? jailConfigFromEnv());
    this.jailer = config && new Jailer(config, log);
    if (!this.jailer) log?.("QEMU runs unjailed (COCOON_JAIL=off or not root): VMs share the server's uid and namespaces");
  }

  /** A uid of the VM range that nothing of this server holds, released with `stack`. */
  allocateUid(stack: ReleaseStack): number {
    const range = vmUidRange();
    let uid: number;
    do uid = range.first + randomInt(range.count);
    while (this.uids.has(uid));
    return this.holdUid(uid, stack);
  }

  /** Marks a recorded uid as held again (after a restart), released with `stack`. */
  holdUid(uid: number, stack: ReleaseStack): number {
    this.uids.add(uid);
    stack.push("uid", async () => void this.uids.delete(uid));
    return uid;
  }

  /**
   * Makes `writable` (a VM's disk, a template's memory) its uid's alone.
   * Unjailed, QEMU runs as the server and they stay the server's.
   */
  async prepareFiles(uid: number, writable: string[]): Promise<void> {
    if (!this.jailer) return;
    for (const p of writable) {
      await chown(p, uid, uid);
      await chmod(p, 0o600);
    }
  }

  /**
   * Gives a process's volume files to it: a read-write one is its uid's alone
   * (at most one VM writes a volume), a read-only one root's and readable by
   * all (several VMs read it; outside a jail the volumes directory is root's
   * alone, and a jail mounts only its own VM's volumes).
   */
  async prepareVolumes(uid: number, volumes: VolumeDisk[]): Promise<void> {
    await this.prepareFiles(uid, volumes.filter((v) => !v.readOnly).map((v) => v.path));
    if (!this.jailer) return;
    for (const v of volumes.filter((v) => v.readOnly)) {
      await chown(v.path, 0, 0);
      await chmod(v.path, 0o644);
    }
  }

  /**
   * Starts one QEMU process: its network, its jail, the process. Each release
   * is pushed on `stack` as soon as what it releases may exist, so a failure
   * part-way (or a crash: see `adoptProcess`) leaves nothing behind once
   * `stack` is released.
   */
  async startProcess(spec: MachineSpec, network: VmNetworkRecord, uid: number, stack: ReleaseStack, clock?: PhaseClock, opts: { background?: boolean } = {}): Promise<Machine> {
    const identity: ProcessIdentity = { name: spec.name, vmDir: spec.vmDir, network };
    const steps = this.releaseSteps(identity);
    stack.push("sockets", steps.sockets);
    await this.prepareSockets(spec.name, uid);
    stack.push("network", steps.network);
    spec.net = await this.network.start(network, spec.forwards);
    clock?.mark("network");
    stack.push("jail", steps.jail);
    spec.jail = await this.prepareJail(spec, uid, opts.background);
    spec.uid = uid;
    clock?.mark("jail");
    const started: { machine?: Machine } = {};
    stack.push("qemu", () => (started.machine ? started.machine.stop() : steps.qemu()));
    started.machine = await Machine.start(spec);
    clock?.mark("spawn");
    return started.machine;
  }

  /** Gives the process named `name`, started in the background (`startProcess`), its VM's share of CPU. */
  async foreground(name: string, vcpus: number): Promise<void> {
    await this.jailer?.foreground(name, vcpus);
  }

  /**
   * The release steps of a process this server did not start (found after a
   * restart, running or not): the same as `startProcess` pushes, all at once.
   */
  adoptProcess(identity: ProcessIdentity, stack: ReleaseStack, machine?: Machine): void {
    const steps = this.releaseSteps(identity);
    stack.push("sockets", steps.sockets);
    stack.push("network", steps.network);
    stack.push("jail", steps.jail);
    stack.push("qemu", () => (machine ? machine.stop() : steps.qemu()));
  }

  /** The process's socket directory: root's, traversable by its uid only (when jailed), fresh. */
  private async prepareSockets(name: string, uid: number): Promise<void> {
    const dir = socketPaths(name).dir;
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir, { recursive: true, mode: 0o710 });
    if (this.jailer) await chown(dir, 0, uid);
    await chmod(dir, 0o710);
  }

  /** The one definition of how each part of a QEMU process is given back; each step is idempotent. */
  private releaseSteps(p: ProcessIdentity) {
    return {
      sockets: () => rm(socketPaths(p.name).dir, { recursive: true, force: true }),
      network: () => this.network.stop(p.network),
      // Kills whatever is left in the jail's cgroup before removing it.
      jail: async () => this.jailer?.release(p.name, p.vmDir),
      qemu: () => killQemuNamed(p.name, p.pid),
    };
  }

  /**
   * The jail of one QEMU process: read-write only its disk, a template's
   * memory file (a clone's where QEMU cannot open it read-only), its passt socket directory and its socket directory (root-owned: only
   * sockets the server makes there are its); read-only the boot files (a cold boot only) and the disk's
   * backing chain (from the manifest, not the disk's header); a cgroup of the
   * VM's vCPUs and memory plus QEMU's overhead.
   */
  private async prepareJail(spec: MachineSpec, uid: number, background = false) {
    if (!this.jailer) return undefined;
    const volumes = spec.volumes ?? [];
    const readWrite = [spec.disk.path, socketPaths(spec.name).dir, ...volumes.filter((v) => !v.readOnly).map((v) => v.path)];
    const readOnly = [...(spec.incomingState ? [] : [spec.kernel, spec.initramfs]), ...spec.disk.backing, ...volumes.filter((v) => v.readOnly).map((v) => v.path)];
    if (spec.memory.kind === "file") (readOnlyMemoryFile(spec.memory) ? readOnly : readWrite).push(spec.memory.path);
    if (spec.net?.kind === "passt") readWrite.push(dirname(spec.net.socket));
    return this.jailer.prepare({
      name: spec.name,
      vmDir: spec.vmDir,
      uid,
      vcpus: spec.vcpus,
      background,
      memoryBytes: (spec.memoryMiB + qemuOverheadMiB(spec.accelerator)) * 1024 * 1024,
      mounts: {
        readOnly,
        readWrite,
        devices: spec.accelerator === "kvm" ? ["/dev/kvm"] : [],
      },
    });
  }
}

/**
 * A free host loopback port for each guest port, all different (the kernel
 * picks them: a port just released may be picked again at once, and two
 * forwards of one port make QEMU refuse the second).
 */
export async function allocateForwards(guestPorts: number[]): Promise<PortForward[]> {
  const forwards: PortForward[] = [];
  for (const guestPort of guestPorts) {
    let hostPort: number;
    do hostPort = await freeLoopbackPort();
    while (forwards.some((f) => f.hostPort === hostPort));
    forwards.push({ guestPort, hostPort });
  }
  return forwards;
}
