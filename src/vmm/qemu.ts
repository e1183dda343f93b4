import { spawn, type StdioOptions } from "node:child_process";
import { openSync, closeSync, readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { sleep } from "../util/process.ts";
import type { Jail } from "./jail/index.ts";
import type { NetBackend } from "./network/index.ts";
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

/** Where guest RAM lives. */
export type GuestMemory =
  /** A file; `shared` writes go to the file (a snapshot template), otherwise a private copy-on-write mapping of it (a clone). */
  | { kind: "file"; path: string; shared: boolean }
  /** Anonymous RAM, filled by an incoming migration stream (a resumed VM). */
  | { kind: "anonymous" };

/** Everything that decides the QEMU command line of one VM process. */
export interface MachineSpec {
  vmDir: string;
  name: string;
  accelerator: Accelerator;
  vcpus: number;
  memoryMiB: number;
  memory: GuestMemory;
  kernel: string;
  initramfs: string;
  cmdline: string;
  disk: string;
  forwards: PortForward[];
  /** How `net0` reaches the host (default user-mode, restrict=on); with passt, `forwards` are passt's and ignored here. */
  net?: NetBackend;
  /**
   * A saved state to restore (a snapshot's or a suspended VM's): QEMU starts
   * paused and reads it from descriptor INCOMING_STATE_FD, opened read-only
   * here. Absent: a cold boot.
   */
  incomingState?: string;
  /** The jail QEMU runs in (src/vmm/jail); unjailed when absent. */
  jail?: Jail;
}

/**
 * What the QEMU process may write lives in `<vmDir>/qemu/` (owned by the VM's
 * uid when jailed); the VM's record and saved states stay beside it, out of reach.
 */
export const machinePaths = (vmDir: string) => {
  const dir = join(vmDir, "qemu");
  return {
    dir,
    qmp: join(dir, "qmp.sock"),
    pidfile: join(dir, "qemu.pid"),
    console: join(dir, "console.log"),
    log: join(dir, "qemu.log"),
    migration: join(dir, "migration.sock"),
  };
};

/**
 * TCG's translated-code cache, in MiB. QEMU's default is an eighth of host RAM
 * (up to 1 GiB), filled lazily: bounded here so a VM's memory cap is known.
 */
const TCG_CODE_CACHE_MIB = 256;

/** Host memory a VM's QEMU process uses beyond guest RAM: device emulation, buffers, and TCG's code cache. */
export function qemuOverheadMiB(accelerator: Accelerator): number {
  return 128 + (accelerator === "tcg" ? TCG_CODE_CACHE_MIB : 0);
}

/** The kernel command line; parameters read by cocoon-agent are prefixed `cocoon.` (see agent/PROTOCOL.md). */
export function guestCmdline(opts: { accelerator: Accelerator; token: string; hostname: string }): string {
  const params = [
    "console=ttyS0",
    "quiet",
    "loglevel=3",
    "panic=-1", // with -no-reboot a guest panic ends the QEMU process, which the server sees
    "i8042.noaux",
    "i8042.nomux",
    "i8042.dumbkbd",
    "cocoon.root=/dev/vda",
    `cocoon.token=${opts.token}`,
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

export function qemuArgs(spec: MachineSpec): string[] {
  const paths = machinePaths(spec.vmDir);
  const memory =
    spec.memory.kind === "file"
      ? `memory-backend-file,id=mem,size=${spec.memoryMiB}M,mem-path=${spec.memory.path},share=${spec.memory.shared ? "on" : "off"}`
      : `memory-backend-ram,id=mem,size=${spec.memoryMiB}M`;
  const hostfwd = spec.forwards.map((f) => `,hostfwd=tcp:127.0.0.1:${f.hostPort}-${GUEST_NET.ip}:${f.guestPort}`).join("");
  return [
    "-name", `${spec.name},process=cocoon-${spec.name}`,
    // x-option-roms=off: no firmware ROMs to load; rtc=on: the guest reads wall time at boot.
    "-M", "microvm,x-option-roms=off,rtc=on,memory-backend=mem",
    "-accel", spec.accelerator === "tcg" ? `tcg,tb-size=${TCG_CODE_CACHE_MIB}` : "kvm",
    // la57=off: 4-level paging; a 5-level page walk costs every TCG TLB miss (~10 % on fork+exec).
    "-cpu", spec.accelerator === "kvm" ? "host" : "max,la57=off",
    "-smp", String(spec.vcpus),
    "-m", `${spec.memoryMiB}M`,
    "-object", memory,
    "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
    "-chardev", `file,id=console,path=${paths.console},append=on`,
    "-serial", "chardev:console",
    "-kernel", spec.kernel,
    "-initrd", spec.initramfs,
    "-append", spec.cmdline,
    "-drive", `id=root,file=${spec.disk},format=qcow2,if=none,discard=unmap,detect-zeroes=unmap`,
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
    "-qmp", `unix:${paths.qmp},server=on,wait=off`,
    // QEMU's seccomp filter: no exec or fork, no privilege or scheduler changes, no obsolete syscalls.
    ...(spec.jail ? ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"] : ["-pidfile", paths.pidfile]),
    ...(spec.incomingState ? ["-incoming", "defer"] : []),
  ];
}

/**
 * The descriptor a restoring QEMU reads its saved state from. QEMU reading the
 * file itself is what makes a resume fast: streamed through a socket from the
 * server, every hand-over between the two processes waited on the scheduler
 * (a jailed QEMU sits in a CPU cgroup of its own), ~290 vs ~110 ms for a
 * resume's ~100 MiB.
 */
export const INCOMING_STATE_FD = 3;

/**
 * Starts QEMU (in its jail when the spec has one) in a session of its own, so
 * a server crash or restart leaves the VM running, and returns the process's
 * host pid and a QMP connection once QEMU listens. Startup errors come from
 * its log (`machinePaths(vmDir).log`).
 */
export async function startQemu(spec: MachineSpec): Promise<{ pid: number; qmp: QmpClient }> {
  const paths = machinePaths(spec.vmDir);
  for (const p of Object.values(paths)) {
    if (Buffer.byteLength(p) > 107) throw new Error(`path too long for a unix socket (max 107 bytes): ${p}`);
  }
  const qemuArgv = ["qemu-system-x86_64", ...qemuArgs(spec)];
  const [command, ...args] = spec.jail ? spec.jail.command(qemuArgv, spec.incomingState ? INCOMING_STATE_FD : 2) : qemuArgv;
  const log = openSync(paths.log, "w", 0o600);
  let exited: string | undefined;
  let state: number | undefined;
  try {
    state = spec.incomingState ? openSync(spec.incomingState, "r") : undefined;
    const stdio: StdioOptions = state === undefined ? ["ignore", log, log] : ["ignore", log, log, state];
    const child = spawn(command!, args, { detached: true, stdio, env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin" } });
    child.on("error", (err: NodeJS.ErrnoException) => {
      exited = err.code === "ENOENT" ? `${command} is not installed (run scripts/setup.sh)` : err.message;
    });
    child.on("exit", (code, signal) => (exited ??= `exit ${code ?? signal}`));
    child.unref();
  } finally {
    closeSync(log);
    if (state !== undefined) closeSync(state);
  }
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (exited !== undefined) {
      const output = await readFile(paths.log, "utf8").catch(() => "");
      throw new Error(`QEMU failed to start (${exited}): ${output.trim().slice(-1000)}`);
    }
    const qmp = await QmpClient.connect(paths.qmp).catch(() => undefined);
    if (qmp) {
      const pidfile = spec.jail?.pidfile ?? paths.pidfile;
      return { pid: Number((await readFile(pidfile, "utf8")).trim()), qmp };
    }
    if (Date.now() > deadline) throw new Error("QEMU did not open its QMP socket within 30 s");
    await sleep(3);
  }
}
