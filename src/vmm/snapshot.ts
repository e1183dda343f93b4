import { execFileSync } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { InvalidArgumentError, SnapshotIncompatibleError } from "../errors.ts";
import { exists } from "../util/files.ts";
import { qemuInstall, type Accelerator, type DiskChain } from "./qemu.ts";


/** Layout of snapshot directories this engine writes and reads (`SnapshotManifest.formatVersion`). */
export const SNAPSHOT_FORMAT = 5;

/** What a snapshot directory holds, written last (its presence means the snapshot is complete). */
export interface SnapshotManifest {
  /** `SNAPSHOT_FORMAT`: 3 has an explicit disk chain and no secret on the kernel command line; 4 has the volume slots (qemu.ts VOLUME_SLOTS); 5 has no i8254 PIT (`pit=off`, qemu.ts). */
  formatVersion: typeof SNAPSHOT_FORMAT;
  createdAt: string;
  accelerator: Accelerator;
  /** `qemuBuild()` of the QEMU that made it: device state only restores into the same build. */
  qemuBuild: string;
  vcpus: number;
  memoryMiB: number;
  kernel: string;
  /** The initramfs to restore with (the shared one: a template's own initrd held its first secret). */
  initramfs: string;
  cmdline: string;
  /** The agent secret inside the snapshot's memory; each clone replaces it on restore. */
  token: string;
  /** Guest ports every clone forwards to a host loopback port (the app's). */
  guestPorts: number[];
  /** Backing files of `disk.qcow2`, nearest first, as the server set them up: never read from the disk. */
  diskBacking: string[];
  /** Virtual size of `disk.qcow2`, in bytes (a clone's overlay gets it without opening the chain). */
  diskBytes: number;
  /**
   * The RAM is in `state` and there is no `memory` file: a snapshot of a
   * running VM (capture.ts). Clones restore it into anonymous memory, as a
   * resume does, instead of mapping a memory file.
   */
  ramInState?: boolean;
}

export interface Snapshot {
  dir: string;
  manifest: SnapshotManifest;
}

export const snapshotFiles = (dir: string) => ({
  disk: join(dir, "disk.qcow2"),
  memory: join(dir, "memory"),
  state: join(dir, "state"),
  manifest: join(dir, "manifest.json"),
});

/** The snapshot's disk with its trusted chain: what a clone's overlay sits on. */
export function snapshotDisk(snapshot: Snapshot): DiskChain {
  return { path: snapshotFiles(snapshot.dir).disk, backing: snapshot.manifest.diskBacking };
}

let build: string | undefined;

/** The QEMU build on this host (its `--version` line, package revision included). */
export function qemuBuild(): string {
  build ??= execFileSync(qemuInstall().system, ["--version"], { encoding: "utf8" }).split("\n")[0]!.trim();
  return build;
}

/**
 * Reads a snapshot written by `Templates.snapshot`. Fails clearly if it is
 * incomplete, and with SnapshotIncompatibleError if this host cannot restore
 * it (another layout, accelerator or QEMU build): the image must be rebuilt.
 */
export async function loadSnapshot(dir: string, host: { accelerator: Accelerator }): Promise<Snapshot> {
  const files = snapshotFiles(dir);
  if (!(await exists(files.manifest))) throw new InvalidArgumentError("snapshot", `no complete snapshot in ${dir}`);
  const manifest = JSON.parse(await readFile(files.manifest, "utf8")) as SnapshotManifest;
  if (manifest.formatVersion !== SNAPSHOT_FORMAT) {
    throw new SnapshotIncompatibleError(`snapshot in ${dir} has format ${String(manifest.formatVersion)}, this server reads ${SNAPSHOT_FORMAT}`, undefined, "format");
  }
  if (manifest.accelerator !== host.accelerator) {
    throw new SnapshotIncompatibleError(`snapshot in ${dir} was made under ${manifest.accelerator} but this host runs ${host.accelerator}`, undefined, "accelerator");
  }
  if (manifest.qemuBuild !== qemuBuild()) {
    throw new SnapshotIncompatibleError(`snapshot in ${dir} was made by "${manifest.qemuBuild}" but this host runs "${qemuBuild()}"`);
  }
  return { dir, manifest };
}
