import { execFileSync, spawn, type StdioOptions } from "node:child_process";
import { closeSync, constants, openSync, readFileSync } from "node:fs";
import { chmod, readFile, rename, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Jail } from "./jail/index.ts";
import type { StateLayout } from "./migration.ts";
import { QmpClient } from "./qmp.ts";

export type Accelerator = "kvm" | "tcg";

/** The guest's fixed network identity: identical in every clone of a snapshot. */
export const GUEST_NET = { ip: "10.0.2.15", prefix: 24, gateway: "10.0.2.2", dns: "10.0.2.3", mac: "52:54:00:c0:c0:01" };
/** Port cocoon-agent listens on inside the guest. */
export const AGENT_PORT = 10789;

export interface PortForward {
  hostPort: number;
  guestPort: number;
}

/** How QEMU attaches `net0`: user-mode (no egress; hostfwd) or a passt socket. */
export type NetBackend = { kind: "user" } | { kind: "passt"; socket: string };

/** A user-mode netdev's rule forwarding host loopback to the guest: `hostfwd=` at start, `hostfwd_add` later (`Machine.addForwards`). */
export const hostfwdRule = (f: PortForward) => `tcp:127.0.0.1:${f.hostPort}-${GUEST_NET.ip}:${f.guestPort}`;

/** The QEMU binaries VMs run on, and the firmware directory that goes with them. */
export interface QemuInstall {
  system: string;
  img: string;
  /** Firmware and ROMs (`-L`); absent: the binary's own default (Debian's /usr/share/qemu). */
  dataDir?: string;
}

/**
 * Debian's QEMU from PATH, or the one under COCOON_QEMU_PREFIX: a prefix
 * holding bin/qemu-system-x86_64, bin/qemu-img and share/qemu (another build
 * unpacked beside the system's, to measure or test it). It must be under
 * /usr: the jail mounts /usr only, read-only.
 */
export function qemuInstallFromEnv(env: NodeJS.ProcessEnv): QemuInstall {
  const prefix = env.COCOON_QEMU_PREFIX;
  if (!prefix) return { system: "qemu-system-x86_64", img: "qemu-img" };
  if (!/^\/usr(\/[A-Za-z0-9_.+-]+)+$/.test(prefix) || prefix.split("/").some((p) => p === "." || p === "..")) {
    throw new Error(`COCOON_QEMU_PREFIX must be an absolute path of plain names under /usr (the jail mounts /usr only), got "${prefix}"`);
  }
  return { system: join(prefix, "bin", "qemu-system-x86_64"), img: join(prefix, "bin", "qemu-img"), dataDir: join(prefix, "share", "qemu") };
}

let install: QemuInstall | undefined;

/** This process's QEMU (`qemuInstallFromEnv`), read once. */
export function qemuInstall(): QemuInstall {
  return (install ??= qemuInstallFromEnv(process.env));
}

/**
 * What the engine uses of a QEMU build when the build has it. Probed, never
 * inferred from a version: QEMU started with no machine answers QMP's
 * `query-migrate-capabilities` and `qom-list-properties` (`qemuFeatures`).
 */
export interface QemuFeatures {
  /**
   * Incoming migration takes `file:` URIs, so a restore reads its state
   * descriptor from an fdset (`file:/dev/fdset/N`) instead of `fd:N`: QEMU
   * ≥ 9.1 warns that `fd:` on a plain file is deprecated, and its removal
   * is under way. Probed by the `mapped-ram` capability, which exists only
   * for `file:` migration.
   */
  fileMigration: boolean;
  /**
   * memory-backend-file has `rom` (QEMU ≥ 8.2): a clone maps its snapshot's
   * memory file with `readonly=on,rom=off` (opened read-only, guest RAM a
   * private copy-on-write mapping), so the file needs no write permission
   * (SECURITY.md). Without it QEMU opens even a private mapping's file read-write.
   */
  readOnlyPrivateMapping: boolean;
}

const probedFeatures = new Map<string, QemuFeatures>();

/** This process's QEMU build's features, probed once per binary (~0.1 s). */
export function qemuFeatures(): QemuFeatures {
  const binary = qemuInstall().system;
  let features = probedFeatures.get(binary);
  if (!features) {
    const commands = [
      { execute: "qmp_capabilities" },
      { execute: "query-migrate-capabilities" },
      { execute: "qom-list-properties", arguments: { typename: "memory-backend-file" } },
      { execute: "quit" },
    ];
    const output = execFileSync(binary, ["-machine", "none", "-nodefaults", "-no-user-config", "-display", "none", "-qmp", "stdio"], {
      input: commands.map((c) => JSON.stringify(c)).join("\n") + "\n",
      encoding: "utf8",
      timeout: 10_000,
    });
    // Answers come in order, after the greeting; events (the quit's SHUTDOWN) carry no `return`.
    const answers = output
      .split("\n")
      .filter((line) => line.startsWith("{"))
      .map((line) => JSON.parse(line) as { return?: unknown })
      .filter((m) => "return" in m)
      .map((m) => m.return);
    const capabilities = answers[1] as { capability: string }[] | undefined;
    const properties = answers[2] as { name: string }[] | undefined;
    if (!Array.isArray(capabilities) || !Array.isArray(properties)) throw new Error(`${binary} did not answer the QMP feature probe: ${output.slice(0, 500)}`);
    features = {
      fileMigration: capabilities.some((c) => c.capability === "mapped-ram"),
      readOnlyPrivateMapping: properties.some((p) => p.name === "rom"),
    };
    probedFeatures.set(binary, features);
  }
  return features;
}

/** Where guest RAM lives. */
export type GuestMemory =
  /** A file; `shared` writes go to the file (a snapshot template), otherwise a private copy-on-write mapping of it (a clone). */
  | { kind: "file"; path: string; shared: boolean }
  /** Anonymous RAM, filled by an incoming migration stream (a resumed VM). */
  | { kind: "anonymous" };

/**
 * A qcow2 disk and the files it reads through, top first. The chain is never
 * taken from a disk's header: a VM's QEMU writes its own disk (a build VM
 * writes what becomes an image's disk), so a header may name any host file.
 * It comes from snapshot manifests, which only the server writes, and QEMU
 * gets it node by node (`backing` set explicitly, null at the bottom).
 */
export interface DiskChain {
  /** The disk QEMU writes: a clone's overlay or a template's disk. */
  path: string;
  /** Its backing files, nearest first; opened read-only. */
  backing: string[];
  /**
   * QEMU opens only `path` at start and the chain when told (`Machine.bindBacking`,
   * before the restore): a fork child's process starts while its parent's
   * capture is still writing the nearest layer (engine.ts `fork`). The files
   * exist (and the jail mounts them) from the start.
   */
  backingLater?: boolean;
}

/**
 * Virtio-blk slots for volumes on every machine: the microvm machine has no
 * hotplug and a restore needs the device set of the snapshot, so every cold
 * boot has them, empty (a zero-size placeholder), and a VM restored with
 * volumes has their files behind the first slots (docs/volumes.md).
 */
export const VOLUME_SLOTS = 4;

/** A volume's file behind a slot; the guest finds it by `volumeSerial(slot)`. */
export interface VolumeDisk {
  /** A raw file the server made (vmm/volumes.ts); never read by the host. */
  path: string;
  readOnly: boolean;
}

/** The virtio serial of a volume slot (0-based), by which the guest agent finds its disk. */
export const volumeSerial = (slot: number) => `cocoon-vol${slot}`;

/** Everything that decides the QEMU command line of one VM process. */
export interface MachineSpec {
  vmDir: string;
  /**
   * The process's name: QEMU's `-name` and its jail's cgroup. It identifies
   * the process on the host (`isQemuNamed`), so it is unique and kept for the
   * VM's whole life (a warm VM handed out under another id keeps it).
   */
  name: string;
  accelerator: Accelerator;
  vcpus: number;
  memoryMiB: number;
  memory: GuestMemory;
  kernel: string;
  initramfs: string;
  cmdline: string;
  disk: DiskChain;
  /** Volumes in slots 0, 1, …; the other slots of VOLUME_SLOTS are empty. */
  volumes?: VolumeDisk[];
  forwards: PortForward[];
  /** How `net0` reaches the host (default user-mode, restrict=on); with passt, `forwards` are passt's and ignored here. */
  net?: NetBackend;
  /**
   * A saved state to restore (a snapshot's or a suspended VM's): QEMU starts
   * paused and reads it from descriptor `INHERITED_FD.incomingState`, opened
   * read-only here. Absent: a cold boot.
   */
  incomingState?: string;
  /** How the RAM in `incomingState` is laid out (default `stream`; `mapped-ram`: a fork's capture). */
  incomingLayout?: StateLayout;
  /** The jail QEMU runs in (src/vmm/jail); unjailed when absent. */
  jail?: Jail;
  /** The uid a jailed QEMU runs as: its migration socket is made its own. */
  uid?: number;
}

/**
 * Files of one QEMU process in the VM's directory, which is root's (0700):
 * no path the server opens can be replaced by a VM. QEMU gets them (and its
 * QMP socket) as descriptors, and reaches nothing by path but its disk, its
 * memory file and its socket directory.
 */
export const machinePaths = (vmDir: string) => ({
  console: join(vmDir, "console.log"),
  log: join(vmDir, "qemu.log"),
});

/**
 * Where the sockets of QEMU processes live: a short path whatever the data
 * directory's (a unix socket path has at most 107 bytes), on a tmpfs that a
 * reboot clears along with the processes. The server's alone when it runs as
 * root; unjailed, a directory of the server's user.
 */
export const SOCKETS_ROOT = process.getuid?.() === 0 ? "/run/cocoon/vm" : join(tmpdir(), `cocoon-${process.getuid?.() ?? 0}`, "vm");

/**
 * The sockets of the QEMU process named `name`, in a directory root owns and
 * only the process's uid may traverse: the QMP socket (root's), and a socket
 * the server makes for each save and gives to that uid before QEMU is told of it.
 */
export const socketPaths = (name: string) => {
  const dir = join(SOCKETS_ROOT, name);
  return { dir, qmp: join(dir, "qmp.sock"), migration: join(dir, "state.sock") };
};

/**
 * TCG's translated-code cache, in MiB. QEMU's default is an eighth of host RAM
 * (up to 1 GiB), filled lazily: bounded here so a VM's memory cap is known.
 * Not smaller: a restore and its first exec translate ~28 MiB, and with
 * 16 MiB an exec round trip took 261 ms instead of 24 (the cache flushed and
 * retranslated on every exec; SPECIFICATION.md, issue #14).
 */
const TCG_CODE_CACHE_MIB = 256;

/** Host memory a VM's QEMU process uses beyond guest RAM: device emulation, buffers, and TCG's code cache. */
export function qemuOverheadMiB(accelerator: Accelerator): number {
  return 128 + (accelerator === "tcg" ? TCG_CODE_CACHE_MIB : 0);
}

/**
 * The kernel command line; parameters read by cocoon-agent are prefixed
 * `cocoon.` (see agent/PROTOCOL.md). It holds no secret: any local user can
 * read a process's command line (the agent's secret comes in the initramfs).
 */
export function guestCmdline(opts: { accelerator: Accelerator; hostname: string }): string {
  const params = [
    "console=ttyS0",
    "quiet",
    "loglevel=3",
    "panic=-1", // with -no-reboot a guest panic ends the QEMU process, which the server sees
    // No soft-lockup watchdog: its timer wakes every idle vCPU every 4 s, and
    // on an overcommitted host a starved vCPU is not a guest bug to report.
    "nowatchdog",
    // No proactive compaction: kcompactd would wake every 500 ms to check the
    // fragmentation of a 256 MiB guest that never needs huge pages; compaction
    // on demand (an allocation that needs it) stays.
    "sysctl.vm.compaction_proactiveness=0",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.dumbkbd",
    "cocoon.root=/dev/vda",
    `cocoon.ip=${GUEST_NET.ip}/${GUEST_NET.prefix}`,
    `cocoon.gw=${GUEST_NET.gateway}`,
    `cocoon.dns=${GUEST_NET.dns}`,
    `cocoon.hostname=${opts.hostname}`,
    `cocoon.port=${AGENT_PORT}`,
  ];
  if (opts.accelerator === "tcg") {
    // microvm has no HPET or PM timer, and under TCG the PIT calibration of the
    // TSC races the emulator and can hang. TCG's TSC ticks at the host TSC rate,
    // so tell the guest that rate instead of letting it measure.
    params.push(`tsc_early_khz=${hostTscKhz()}`, "tsc=reliable", "no_timer_check");
  }
  return params.join(" ");
}

function hostTscKhz(): number {
  const mhz = /cpu MHz\s*:\s*([\d.]+)/.exec(readFileSync("/proc/cpuinfo", "utf8"))?.[1];
  return mhz ? Math.round(Number(mhz) * 1000) : 2_000_000;
}

/**
 * Descriptors QEMU inherits; the jail keeps exactly these open. The console
 * file (append-only) and the listening QMP socket always; the saved state
 * (read-only) when it restores. Reading the state itself is what makes a
 * resume fast: streamed through a socket from the server, every hand-over
 * between the two processes waited on the scheduler (a jailed QEMU sits in a
 * CPU cgroup of its own), ~290 vs ~110 ms for a resume's ~100 MiB.
 */
export const INHERITED_FD = { console: 3, qmp: 4, incomingState: 5 } as const;

/** fdsets (`-add-fd`) QEMU opens inherited descriptors through, as `/dev/fdset/<id>`. */
const FDSET = { console: 1, incomingState: 2 } as const;

/**
 * Where `migrate-incoming` reads a restore's state (`INHERITED_FD.incomingState`):
 * `file:` through its fdset where the build has it (`QemuFeatures.fileMigration`),
 * else `fd:`. The fdset holds the descriptor until it is removed (`fdset`).
 */
export function incomingStateSource(): { uri: string; fdset?: number } {
  return qemuFeatures().fileMigration
    ? { uri: `file:/dev/fdset/${FDSET.incomingState}`, fdset: FDSET.incomingState }
    : { uri: `fd:${INHERITED_FD.incomingState}` };
}

/** A block node's options, as `-blockdev` and QMP's `blockdev-add` take them. */
type BlockNode = Record<string, unknown>;

const chainNodeName = (i: number) => (i === 0 ? "root" : `backing${i}`);

/** The file and qcow2 nodes of the chain's `i`-th file (0: the disk QEMU writes), over `backing` (a node name, or null: none). */
function chainNodes(disk: DiskChain, i: number, backing: string | null): BlockNode[] {
  const top = i === 0;
  const node = chainNodeName(i);
  const access = top ? { discard: "unmap" } : { "read-only": true };
  return [
    { driver: "file", "node-name": `${node}-file`, filename: [disk.path, ...disk.backing][i], ...access },
    { driver: "qcow2", "node-name": node, file: `${node}-file`, backing, ...access, ...(top ? { "detect-zeroes": "unmap" } : {}) },
  ];
}

/** The nodes of a disk's backing chain, deepest first (a node's backing must exist before it). */
export function backingNodes(disk: DiskChain): BlockNode[] {
  const nodes: BlockNode[] = [];
  for (let i = disk.backing.length; i >= 1; i--) nodes.push(...chainNodes(disk, i, i < disk.backing.length ? chainNodeName(i + 1) : null));
  return nodes;
}

/** The disk's own qcow2 node (`root`) over its chain, as `blockdev-reopen` sets it once the chain is bound (`Machine.bindBacking`). */
export function rootNode(disk: DiskChain): BlockNode {
  return chainNodes(disk, 0, disk.backing.length > 0 ? chainNodeName(1) : null)[1]!;
}

/**
 * `-blockdev` nodes of a disk and its chain, deepest first. JSON, so no path
 * needs escaping. With `backingLater`, only the disk itself, over no backing:
 * its chain is bound before the restore (`Machine.bindBacking`).
 */
export function blockdevArgs(disk: DiskChain): string[] {
  const [file, unbound] = chainNodes(disk, 0, null);
  const nodes = disk.backingLater ? [file!, unbound!] : [...backingNodes(disk), file!, rootNode(disk)];
  return nodes.flatMap((n) => ["-blockdev", JSON.stringify(n)]);
}

/** Whether QEMU opens this memory file read-only: a clone's private mapping, where the build can (`QemuFeatures.readOnlyPrivateMapping`). */
export function readOnlyMemoryFile(memory: GuestMemory): boolean {
  return memory.kind === "file" && !memory.shared && qemuFeatures().readOnlyPrivateMapping;
}

/**
 * The volume slots' block nodes and devices: a volume's raw file, or a
 * zero-size null placeholder. A placeholder is writable, so a snapshot's
 * negotiated features never include read-only and any volume may fill the
 * slot at restore (a read-only one adds the feature, which the guest reads
 * when it re-probes the device).
 */
export function volumeArgs(volumes: VolumeDisk[]): string[] {
  if (volumes.length > VOLUME_SLOTS) throw new Error(`at most ${VOLUME_SLOTS} volumes per VM, got ${volumes.length}`);
  const args: string[] = [];
  for (let slot = 0; slot < VOLUME_SLOTS; slot++) {
    const v = volumes[slot];
    const node = `vol${slot}`;
    const blockdev = v
      ? { driver: "raw", "node-name": node, "read-only": v.readOnly, file: { driver: "file", filename: v.path, "read-only": v.readOnly } }
      : { driver: "null-co", "node-name": node, size: 0 };
    args.push("-blockdev", JSON.stringify(blockdev), "-device", `virtio-blk-device,drive=${node},serial=${volumeSerial(slot)}`);
  }
  return args;
}

export function qemuArgs(spec: MachineSpec): string[] {
  const features = qemuFeatures();
  const memory =
    spec.memory.kind === "file"
      ? `memory-backend-file,id=mem,size=${spec.memoryMiB}M,mem-path=${spec.memory.path},share=${spec.memory.shared ? "on" : "off"}${readOnlyMemoryFile(spec.memory) ? ",readonly=on,rom=off" : ""}`
      : `memory-backend-ram,id=mem,size=${spec.memoryMiB}M`;
  const hostfwd = spec.forwards.map((f) => `,hostfwd=${hostfwdRule(f)}`).join("");
  return [
    "-name", `${spec.name},process=cocoon-${spec.name}`,
    ...(qemuInstall().dataDir ? ["-L", qemuInstall().dataDir!] : []),
    // x-option-roms=off: no firmware ROMs to load; rtc=on: the guest reads wall time at boot.
    // pit=off under TCG: the guest's clock events are its local APIC's (tsc_early_khz, guestCmdline),
    // but the firmware leaves the i8254 counting, and QEMU's emulated PIT woke the main loop at every
    // output edge (every 27 ms) for an interrupt no guest listened to: half of an idle VM's CPU.
    "-M", `microvm,x-option-roms=off,rtc=on${spec.accelerator === "tcg" ? ",pit=off" : ""},memory-backend=mem`,
    // qboot, the minimal firmware Debian's QEMU 7.2 loads for microvm: QEMU 10's package loads
    // SeaBIOS's instead. Named, so every build boots and snapshots the same (small) firmware.
    "-bios", "qboot.rom",
    "-accel", spec.accelerator === "tcg" ? `tcg,tb-size=${TCG_CODE_CACHE_MIB}` : "kvm",
    // la57=off: 4-level paging; a 5-level page walk costs every TCG TLB miss (~10 % on fork+exec).
    "-cpu", spec.accelerator === "kvm" ? "host" : "max,la57=off",
    "-smp", String(spec.vcpus),
    "-m", `${spec.memoryMiB}M`,
    "-object", memory,
    "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
    // The console file is the server's, opened append-only and handed over.
    "-add-fd", `fd=${INHERITED_FD.console},set=${FDSET.console}`,
    "-chardev", `file,id=console,path=/dev/fdset/${FDSET.console},append=on`,
    "-serial", "chardev:console",
    // The boot files only for a cold boot: QEMU keeps a private copy of the kernel image for the
    // firmware (fw_cfg), ~14 MiB per process, and a restored guest never reads it (-no-reboot).
    ...(spec.incomingState ? [] : ["-kernel", spec.kernel, "-initrd", spec.initramfs, "-append", spec.cmdline]),
    ...blockdevArgs(spec.disk),
    "-device", "virtio-blk-device,drive=root",
    // restrict=on: the guest cannot open connections to the host or beyond;
    // only the explicit hostfwd rules (host loopback → guest) pass. With egress,
    // net0 is a stream to the VM's passt (src/vmm/network); the device is the same,
    // so snapshots and suspended states restore under either backend.
    "-netdev",
    spec.net?.kind === "passt"
      ? `stream,id=net0,server=off,addr.type=unix,addr.path=${spec.net.socket}`
      : `user,id=net0,restrict=on,ipv6=off${hostfwd}`,
    "-device", `virtio-net-device,netdev=net0,mac=${GUEST_NET.mac}`,
    // slirp has a migration section of its own ('slirp' 0): a passt VM keeps an
    // idle, unconnected user-mode netdev so states move between the two backends.
    ...(spec.net?.kind === "passt" ? ["-netdev", "user,id=slirp0,restrict=on,ipv6=off"] : []),
    ...volumeArgs(spec.volumes ?? []),
    // The QMP socket is the server's, listening already; QEMU accepts on it.
    "-chardev", `socket,id=qmp,fd=${INHERITED_FD.qmp},server=on,wait=off`,
    "-mon", "chardev=qmp,mode=control",
    // QEMU's seccomp filter: no exec or fork, no privilege or scheduler changes, no obsolete syscalls.
    ...(spec.jail ? ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"] : []),
    // Only where `file:` reads it: an fdset's descriptor that `fd:` closed could be closed again, reused, when QMP disconnects.
    ...(spec.incomingState && features.fileMigration ? ["-add-fd", `fd=${INHERITED_FD.incomingState},set=${FDSET.incomingState}`] : []),
    ...(spec.incomingState ? ["-incoming", "defer"] : []),
  ];
}

/**
 * Starts QEMU (in its jail when the spec has one) in a session of its own, so
 * a server crash or restart leaves the VM running, and returns the process's
 * host pid and a QMP connection. The server makes the QMP socket itself, in
 * the process's root-owned socket directory, and hands QEMU the listening
 * descriptor: a restarted server reconnects by a path no VM can replace. Startup errors
 * come from QEMU's log (`machinePaths(vmDir).log`).
 */
export async function startQemu(spec: MachineSpec): Promise<{ pid: number; qmp: QmpClient }> {
  const paths = { ...machinePaths(spec.vmDir), ...socketPaths(spec.name) };
  const qemuArgv = [qemuInstall().system, ...qemuArgs(spec)];
  const lastFd = spec.incomingState ? INHERITED_FD.incomingState : INHERITED_FD.qmp;
  const [command, ...args] = spec.jail ? spec.jail.command(qemuArgv, lastFd) : qemuArgv;
  const listener = await listenUnix(`${paths.qmp}.new`);
  const opened: number[] = [];
  let exited: string | undefined;
  let pid: number | undefined;
  try {
    const open = (path: string, flags: number) => {
      const fd = openSync(path, flags | constants.O_NOFOLLOW, 0o600);
      opened.push(fd);
      return fd;
    };
    const log = open(paths.log, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC);
    const stdio: StdioOptions = ["ignore", log, log, open(paths.console, constants.O_WRONLY | constants.O_CREAT | constants.O_APPEND), listener.fd];
    if (spec.incomingState) stdio.push(open(spec.incomingState, constants.O_RDONLY));
    const child = spawn(command!, args, { detached: true, stdio, env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin" } });
    child.on("error", (err: NodeJS.ErrnoException) => {
      exited = err.code === "ENOENT" ? `${command} is not installed (run scripts/setup.sh)` : err.message;
    });
    child.on("exit", (code, signal) => (exited ??= `exit ${code ?? signal}`));
    child.unref();
    pid = child.pid;
    await rename(`${paths.qmp}.new`, paths.qmp);
    await chmod(paths.qmp, 0o600);
  } finally {
    for (const fd of opened) closeSync(fd);
    // Moved first: closing the server's copy of the listener unlinks nothing.
    await listener.close();
  }
  const failure = async (why: string) => {
    const output = await readFile(paths.log, "utf8").catch(() => "");
    return new Error(`QEMU failed to start (${why}): ${output.trim().slice(-1000)}`);
  };
  const gone = new AbortController();
  const watch = setInterval(() => exited !== undefined && gone.abort(), 10);
  try {
    const qmp = await QmpClient.connect(paths.qmp, { timeoutMs: 30_000, signal: gone.signal }).catch(async (err: Error) => {
      throw await failure(exited ?? err.message);
    });
    // Jailed, the child is the jail's `unshare`; QEMU's host pid is in the jail's pidfile.
    if (spec.jail) pid = Number((await readFile(spec.jail.pidfile, "utf8")).trim());
    if (!pid) throw await failure("no pid");
    return { pid, qmp };
  } finally {
    clearInterval(watch);
  }
}

/** A listening unix socket whose descriptor a child can inherit. */
async function listenUnix(path: string): Promise<{ fd: number; close(): Promise<void> }> {
  await rm(path, { force: true });
  const server = createServer();
  await new Promise<void>((resolve, reject) => server.once("error", reject).listen(path, resolve));
  // Node has no public accessor for a listening pipe's descriptor.
  const fd = (server as unknown as { _handle: { fd: number } })._handle.fd;
  return { fd, close: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}
