import { chmod, chown, link, mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ApiError, InvalidVmStateError } from "../errors.ts";
import { fsyncFile, writeFileAtomic } from "../util/files.ts";
import { run } from "../util/process.ts";
import type { StateLayout } from "./migration.ts";
import { qemuInstall } from "./qemu.ts";
import type { PhaseClock } from "./phases.ts";
import { qemuBuild, SNAPSHOT_FORMAT, snapshotDisk, snapshotFiles, type Snapshot, type SnapshotManifest } from "./snapshot.ts";
import { vmFiles, type MicroVm, type VmRecord } from "./vm.ts";

/**
 * Captures of a running VM (named snapshots and forks): its memory, devices
 * and disk at one instant, while it keeps running. Its RAM is copied while
 * it runs (pre-copy, `Machine.saveRunning`); its vCPUs stop only for the last
 * pass, during which its overlay is copied (QEMU has drained and flushed its
 * disk by then, so the copy is consistent with the RAM) and its device state
 * and the RAM dirtied since are written. Everything else (older layers, which
 * are read-only, and making a snapshot's files durable) happens after it runs
 * again. A fork's state is never made durable: it is removed once the
 * children have read it, and a crash removes it too.
 *
 * A capture directory holds `state` (device state and all RAM, the stream
 * a resume reads), `disk.qcow2` (the overlay as it was) and `layer-<n>.qcow2`
 * (the VM's own older layers, hard links where the filesystem allows): with
 * the VM's snapshot disk under them, the explicit chain of its disk.
 */
export interface VmCapture {
  dir: string;
  /** The agent secret inside the captured memory: whoever restores it re-keys with it. */
  token: string;
  /** Device state and RAM. */
  state: string;
  /** The captured disk layers, nearest first: `disk.qcow2`, then the VM's older layers. */
  layers: string[];
  /** How long the VM's vCPUs were stopped. */
  pauseMs: number;
}

/** Throws unless `vm` can be captured now: running, without volumes. */
export function assertCapturable(vm: MicroVm): void {
  if (vm.status !== "running" || !vm.machine) throw new InvalidVmStateError(vm.id, vm.status, "snapshot");
  const volumes = vm.record.volumes ?? [];
  if (volumes.length > 0) {
    // Its memory holds the volumes mounted: a copy would write them too (or find them gone).
    const names = volumes.map((v) => `${v.volumeId} at ${v.path}`).join(", ");
    throw new ApiError("Conflict", `microVM ${vm.id} has volumes attached (${names}): it cannot be snapshotted or forked`, { volumes: volumes.map((v) => v.volumeId) });
  }
}

/**
 * Captures `vm` (running) into `dir`, which holds no capture yet (it may
 * have been prepared: `prepareCapture`). Its state goes to `dir/state` as a
 * stream, or where `state` says in its layout (a fork's: `prepareCapture`).
 * The caller holds the VM's lock.
 */
export async function captureVm(vm: MicroVm, dir: string, opts: { durable: boolean; clock?: PhaseClock; state?: CaptureState }): Promise<VmCapture> {
  const clock = opts.clock;
  assertCapturable(vm);
  const machine = vm.machine!;
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const files = snapshotFiles(dir);
  const state = opts.state ?? { path: files.state, layout: "stream" };
  const token = vm.record.token;
  clock?.mark("prepare");
  // Both files are written in place (a fork's children hold them already: `prepareCapture`).
  const { pauseMs } = await machine.saveRunning(
    state.path,
    async () => {
      clock?.mark("live-copy");
      await run("cp", ["--sparse=always", vmFiles(vm.dir).disk, files.disk]);
      clock?.mark("disk-copy");
    },
    state.layout,
  );
  clock?.mark("last-pass");
  const layers = [files.disk];
  for (const [i, layer] of (vm.record.diskLayers ?? []).entries()) {
    const copy = join(dir, `layer-${i + 1}.qcow2`);
    await linkOrCopy(layer, copy);
    layers.push(copy);
  }
  await sealLayers(layers);
  clock?.mark("layers");
  if (opts.durable) {
    await chmod(state.path, 0o600);
    await fsyncFile(state.path);
    clock?.mark("state-fsync");
  }
  return { dir, token, state: state.path, layers, pauseMs };
}

/**
 * Makes a capture a snapshot that launches like an image's: its manifest
 * names the disk chain explicitly (the captured layers, then the chain of
 * the snapshot the VM was launched from) and says the RAM is in the state.
 */
export async function writeCaptureManifest(capture: VmCapture, vm: MicroVm, from: Snapshot): Promise<Snapshot> {
  const m = from.manifest;
  const base = snapshotDisk(from);
  const manifest: SnapshotManifest = {
    formatVersion: SNAPSHOT_FORMAT,
    createdAt: new Date().toISOString(),
    accelerator: m.accelerator,
    qemuBuild: qemuBuild(),
    vcpus: vm.record.vcpus,
    memoryMiB: vm.record.memoryMiB,
    kernel: m.kernel,
    initramfs: m.initramfs,
    cmdline: m.cmdline,
    token: capture.token,
    guestPorts: vm.record.forwards.map((f) => f.guestPort),
    diskBacking: [...capture.layers.slice(1), ...(vm.record.diskLayersComplete ? [] : [base.path, ...base.backing])],
    diskBytes: vm.record.diskBytes,
    ramInState: true,
  };
  await writeFileAtomic(snapshotFiles(capture.dir).manifest, JSON.stringify(manifest, null, 2), 0o600);
  return { dir: capture.dir, manifest };
}

/** Where a capture's state goes, and how its RAM is laid out there. */
export interface CaptureState {
  path: string;
  layout: StateLayout;
}

/**
 * Makes a capture's `disk.qcow2` and its state file (`state.path`: `dir/state`
 * or, in the mapped-ram layout, a file the VM's QEMU may open), empty,
 * before the capture: it writes them in place (truncated, never replaced),
 * so a fork's children, whose processes start during the capture, link and
 * open them already (engine.ts `fork`). Made root's, 0600: a state the VM's
 * QEMU writes itself is given to its uid by the caller.
 */
export async function prepareCapture(dir: string, state: CaptureState): Promise<void> {
  await mkdir(dir, { mode: 0o700 });
  for (const file of [snapshotFiles(dir).disk, state.path]) await writeFile(file, "", { mode: 0o600, flag: "wx" });
}

/** A fork child's link of the capture's disk, in its directory beside its own disk. */
const CHILD_NEAREST_LAYER = "layer-0.qcow2";

/**
 * The overlay every child of a fork copies as its disk, made once into the
 * capture's directory `dir`. Its backing is named relative to it (the
 * child's link of the capture's disk beside it: `forkLayers`), so one file
 * serves every child, where a `qemu-img` per child cost the server a fork of
 * its whole process each (~10 ms of its CPU, ten at once in a fork of ten).
 * -u: nothing is opened (the capture's disk is still empty); a chain is the
 * record's, never a header's.
 */
export async function makeChildOverlay(dir: string, diskBytes: number): Promise<string> {
  const overlay = join(dir, "child-disk.qcow2");
  await run(qemuInstall().img, ["create", "-q", "-f", "qcow2", "-u", "-b", CHILD_NEAREST_LAYER, "-F", "qcow2", overlay, String(diskBytes)]);
  return overlay;
}

/**
 * A fork child's own links of the layers of its parent's capture into `dir`
 * (`prepareCapture`), nearest first: the capture's disk, which the capture
 * fills afterwards (the same file; both directories are under vms/), then
 * the parent's older layers, read-only already.
 */
export async function forkLayers(dir: string, parent: VmRecord, vmDir: string): Promise<string[]> {
  const layers = [join(vmDir, CHILD_NEAREST_LAYER)];
  await link(snapshotFiles(dir).disk, layers[0]!);
  for (const [i, layer] of (parent.diskLayers ?? []).entries()) {
    layers.push(join(vmDir, `layer-${i + 1}.qcow2`));
    await linkOrCopy(layer, layers[i + 1]!);
  }
  return layers;
}

/** Layers are read-only for good: root's, mode 0444 (a jailed QEMU opens them read-only). */
async function sealLayers(layers: string[]): Promise<void> {
  for (const p of layers) {
    await fsyncFile(p);
    await chown(p, 0, 0);
    await chmod(p, 0o444);
  }
}

/** A hard link (layers never change, so sharing the inode is sharing the data), or a sparse copy across filesystems. */
export async function linkOrCopy(from: string, to: string): Promise<void> {
  try {
    await link(from, to);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EXDEV") throw err;
    await run("cp", ["--sparse=always", from, to]);
    await chmod(to, 0o444);
  }
}
