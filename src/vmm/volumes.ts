import { constants } from "node:fs";
import { mkdir, open, readdir, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import { InvalidArgumentError } from "../errors.ts";
import { fsyncDir, fsyncFile } from "../util/files.ts";
import { run } from "../util/process.ts";

/**
 * Persistent volumes on the host: one raw file each, `volumes/<id>.raw` in
 * the data directory (root's, 0700). The host writes a fresh file once (a
 * sparse file and an empty ext4 made by mkfs, before any VM has had it) and
 * from then on never reads, parses or mounts it: what a VM wrote there is
 * untrusted, and a filesystem image is kernel attack surface. QEMU hands it
 * to the guest as a virtio-blk device; the guest mounts it (docs/volumes.md).
 */

/** What the guest sees of one volume: its file behind a slot, mounted at `path`. */
export interface VolumeAttachment {
  volumeId: string;
  /** Where the guest mounts it. */
  path: string;
  readOnly: boolean;
}

/** Volume ids the server makes: the only names a volume file path is built from. */
const VOLUME_ID = /^vol-[0-9a-f]{12}$/;

export function volumeFile(dataDir: string, volumeId: string): string {
  if (!VOLUME_ID.test(volumeId)) throw new InvalidArgumentError("volumeId", `not a volume id: ${JSON.stringify(volumeId)}`);
  return join(dataDir, "volumes", `${volumeId}.raw`);
}

/**
 * Makes a volume's file: sparse, `sizeGiB` long, an empty ext4 (lazy init:
 * only metadata is written, so a 32 GiB volume takes a few MiB and well under
 * a second). Written under a temporary name and renamed, so a crash leaves
 * no half-made volume under its name.
 */
export async function createVolumeFile(dataDir: string, volumeId: string, sizeGiB: number): Promise<void> {
  const path = volumeFile(dataDir, volumeId);
  await mkdir(join(dataDir, "volumes"), { recursive: true, mode: 0o700 });
  const partial = `${path}.new`;
  const file = await open(partial, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW, 0o600);
  try {
    await file.truncate(sizeGiB * 2 ** 30);
  } finally {
    await file.close();
  }
  try {
    // root_owner: the guest's root owns the filesystem's root; -m 0: no blocks reserved for root.
    await run("mkfs.ext4", ["-F", "-q", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0", "-L", volumeId.slice(0, 16), partial]);
    await fsyncFile(partial);
    await rename(partial, path);
    await fsyncDir(join(dataDir, "volumes"));
  } catch (err) {
    await rm(partial, { force: true });
    throw err;
  }
}

/** Removes a volume's file (gone already is fine). */
export async function removeVolumeFile(dataDir: string, volumeId: string): Promise<void> {
  const path = volumeFile(dataDir, volumeId);
  await rm(path, { force: true });
  await rm(`${path}.new`, { force: true });
}

/** The ids of the volume files in the data directory (a file left half-made counts under its id). */
export async function listVolumeIds(dataDir: string): Promise<string[]> {
  const names = await readdir(join(dataDir, "volumes")).catch(() => [] as string[]);
  return [...new Set(names.map((n) => /^(vol-[0-9a-f]{12})\.raw(\.new)?$/.exec(n)?.[1]).filter((id): id is string => id !== undefined))];
}
