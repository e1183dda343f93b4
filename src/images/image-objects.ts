import { randomBytes } from "node:crypto";
import { chmod, mkdir, rename, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { ApiError, SnapshotIncompatibleError } from "../errors.ts";
import type { ObjectStore } from "../store/objects.ts";
import { fsyncDir, writeFileAtomic } from "../util/files.ts";
import { SNAPSHOT_FORMAT, VM_LIMITS, type GuestBootAssets, type Snapshot, type SnapshotManifest } from "../vmm/engine.ts";
import { qemuFeatures } from "../vmm/qemu.ts";
import { qemuBuild } from "../vmm/snapshot.ts";

/** What a published image says besides its files (its manifest's `meta`, with `layers`); read back as untrusted. */
export interface ImageMeta {
  /** The image's id (a managed image's: `managed-<name>-<key>`). */
  image: string;
  /** The QEMU build and accelerator that made the snapshot: it restores only into the same. */
  qemuBuild: string;
  accelerator: string;
  vcpus: number;
  memoryMiB: number;
  /** The agent secret in the snapshot's memory (every clone re-keys it). */
  token: string;
  guestPorts: number[];
  diskBytes: number;
  /** The RAM is in `state` (a snapshot of a running VM) and there is no `memory` file. */
  ramInState: boolean;
}

/** A published snapshot as the database knows it (an image's row, a managed image's `cluster_snapshots` row): what a pull trusts. */
export interface PublishedSnapshot {
  id: string;
  vcpus: number;
  memoryMiB: number;
  diskGiB: number;
  /** The prefix it is published under, and its manifest's sha256. */
  object: string | null;
  manifest: string | null;
}

const GiB = 2 ** 30;
const MiB = 2 ** 20;

/**
 * Images in the cluster's object store (docs/cluster.md): a READY image's
 * snapshot (its memory file, device state and disk) is published once, by
 * the node that built it, as a bundle under `images/<id>/<random>/` in the
 * format suspended VMs use (`ObjectStore.publishLayered`: the layers under
 * its disk as shared blobs, the manifest last, its sha256 pinned in the
 * image's row). Another node pulls it on first use into its images
 * directory, every file checked, and writes a local snapshot manifest: its
 * own kernel, initramfs and command line, the layers' local paths.
 */
export class ImageObjects {
  constructor(
    readonly store: ObjectStore,
    private readonly opts: {
      /** The node's cache of fetched layers (shared with suspended VMs). */
      blobsDir: string;
      accelerator: string;
      /** This node's boot files and command line, which a pulled snapshot is restored with (as a snapshot made here is). */
      boot: GuestBootAssets & { cmdline: string };
    },
  ) {}

  /** Uploads an image's snapshot, the manifest last; returns the prefix, the manifest's sha256 and the bytes uploaded. */
  async publish(id: string, snapshot: Snapshot): Promise<{ prefix: string; manifestSha256: string; bytes: number }> {
    const m = snapshot.manifest;
    const files: Record<string, string> = { "disk.qcow2": join(snapshot.dir, "disk.qcow2"), state: join(snapshot.dir, "state") };
    if (!m.ramInState) files.memory = join(snapshot.dir, "memory");
    const prefix = `images/${id}/${randomBytes(8).toString("hex")}`;
    const meta: ImageMeta = { image: id, qemuBuild: m.qemuBuild, accelerator: m.accelerator, vcpus: m.vcpus, memoryMiB: m.memoryMiB, token: m.token, guestPorts: m.guestPorts, diskBytes: m.diskBytes, ramInState: m.ramInState === true };
    const manifest = await this.store.publishLayered(prefix, files, m.diskBacking, meta);
    return { prefix, manifestSha256: manifest.sha256, bytes: Object.values(manifest.files).reduce((n, f) => n + f.bytes, 0) };
  }

  /**
   * Pulls the snapshot `target.object` names (its manifest the one whose
   * sha256 is `target.manifest`) into `snapshotDir`, which appears
   * complete or not at all (renamed into place). Refused with BadGateway
   * when a file or a field is not what the target allows (naming the object),
   * with SnapshotIncompatibleError when another QEMU build or accelerator
   * made it.
   */
  async pull(target: PublishedSnapshot, snapshotDir: string): Promise<void> {
    const prefix = target.object;
    if (!prefix || !target.manifest) throw new ApiError("Conflict", `image ${target.id} is not in the object store`);
    const memoryBytes = target.memoryMiB * MiB;
    const diskBytes = Math.ceil(target.diskGiB * GiB * 1.1) + 64 * MiB;
    const staging = join(dirname(snapshotDir), `.pulling-${randomBytes(6).toString("hex")}`);
    await mkdir(staging, { recursive: true, mode: 0o700 });
    try {
      const { meta, files, layers } = await this.store.fetchLayered(prefix, staging, {
        limits: { "disk.qcow2": diskBytes, state: Math.ceil(memoryBytes * 1.05) + 64 * MiB, memory: memoryBytes },
        optional: ["memory"],
        sha256: target.manifest,
        blobsDir: this.opts.blobsDir,
        layerMaxBytes: diskBytes,
        check: (raw) => this.checkMeta(raw, target, prefix),
      });
      if (meta.ramInState === (files.memory !== undefined)) throw bad(prefix, meta.ramInState ? "gives a memory file for a snapshot with its RAM in its state" : "gives no memory file");
      const { boot } = this.opts;
      // As a snapshot made here leaves them (Templates.snapshot): root's, the disk read-only.
      await chmod(join(staging, "disk.qcow2"), 0o444);
      await chmod(join(staging, "state"), 0o644);
      if (files.memory) await chmod(join(staging, "memory"), qemuFeatures().readOnlyPrivateMapping ? 0o444 : 0o666);
      const manifest: SnapshotManifest = {
        formatVersion: SNAPSHOT_FORMAT,
        createdAt: new Date().toISOString(),
        accelerator: meta.accelerator as SnapshotManifest["accelerator"],
        qemuBuild: meta.qemuBuild,
        vcpus: meta.vcpus,
        memoryMiB: meta.memoryMiB,
        kernel: boot.kernel,
        initramfs: boot.initramfs,
        cmdline: boot.cmdline,
        token: meta.token,
        guestPorts: meta.guestPorts,
        diskBacking: layers,
        diskBytes: meta.diskBytes,
        ...(meta.ramInState ? { ramInState: true } : {}),
      };
      await writeFileAtomic(join(staging, "manifest.json"), JSON.stringify(manifest, null, 2), 0o600);
      await rm(snapshotDir, { recursive: true, force: true });
      await rename(staging, snapshotDir);
      await fsyncDir(dirname(snapshotDir));
    } finally {
      await rm(staging, { recursive: true, force: true });
    }
  }

  /**
   * Uploads a managed root filesystem (`rootfs/<name>-<key>`): a bundle with
   * no files of its own whose one layer is the disk, the blob the managed
   * snapshots' disks are layered on, so it goes up and comes down once.
   */
  async publishRootfs(target: { name: string; key: string }, disk: string): Promise<{ prefix: string; manifestSha256: string; bytes: number }> {
    const prefix = `images/managed-rootfs-${target.name}-${target.key}/${randomBytes(8).toString("hex")}`;
    const manifest = await this.store.publishLayered(prefix, {}, [disk], { rootfs: target.name, key: target.key });
    return { prefix, manifestSha256: manifest.sha256, bytes: manifest.meta.layers[0]!.bytes };
  }

  /**
   * The local path of a managed root filesystem `publishRootfs` wrote (the
   * bundle at `object` whose manifest's sha256 is `manifest`): its layer in
   * the node's blob cache, checked. BadGateway when the bundle is another
   * filesystem's, has not exactly one layer or one past `maxBytes`.
   */
  async pullRootfs(target: { name: string; key: string; object: string; manifest: string; maxBytes: number }): Promise<string> {
    const staging = join(this.opts.blobsDir, `.pulling-${randomBytes(6).toString("hex")}`);
    await mkdir(staging, { recursive: true, mode: 0o700 });
    try {
      const { layers } = await this.store.fetchLayered(target.object, staging, {
        limits: {},
        sha256: target.manifest,
        blobsDir: this.opts.blobsDir,
        layerMaxBytes: target.maxBytes,
        check: (raw) => {
          if (raw.rootfs !== target.name || raw.key !== target.key) throw bad(target.object, `is not root filesystem ${target.name} (${target.key})`);
          if (!Array.isArray(raw.layers) || raw.layers.length !== 1) throw bad(target.object, "gives a root filesystem of other than one layer");
          return raw;
        },
      });
      return layers[0]!;
    } finally {
      await rm(staging, { recursive: true, force: true });
    }
  }

  /** Removes a published image (deleted): its manifest first. Shared layers stay. */
  async remove(prefix: string): Promise<void> {
    await this.store.deletePrefix(prefix);
  }

  /** The bytes an image's own files take (its memory, state and disk; the shared layers are not its). */
  static async sizeOf(snapshotDir: string): Promise<number> {
    let bytes = 0;
    for (const f of ["disk.qcow2", "state", "memory", "manifest.json"]) bytes += ((await stat(join(snapshotDir, f)).catch(() => undefined))?.blocks ?? 0) * 512;
    return bytes;
  }

  private checkMeta(raw: Record<string, unknown>, target: PublishedSnapshot, prefix: string): ImageMeta {
    const m = raw as Partial<ImageMeta>;
    if (m.image !== target.id) throw bad(prefix, `is for another image (${String(m.image)})`);
    if (typeof m.qemuBuild !== "string" || m.qemuBuild.length > 256 || typeof m.accelerator !== "string" || m.accelerator.length > 16) throw bad(prefix, "names no valid QEMU build and accelerator");
    // Snapshots move only between identical QEMU builds: the message a local snapshot of another build gets.
    if (m.accelerator !== this.opts.accelerator) throw new SnapshotIncompatibleError(`image ${target.id} in the object store was made under ${m.accelerator} but this host runs ${this.opts.accelerator}`, undefined, "accelerator");
    if (m.qemuBuild !== qemuBuild()) throw new SnapshotIncompatibleError(`image ${target.id} in the object store was made by "${m.qemuBuild}" but this host runs "${qemuBuild()}"`);
    if (m.vcpus !== target.vcpus || m.memoryMiB !== target.memoryMiB) throw bad(prefix, `gives another shape than the image's (${String(m.vcpus)} vCPU, ${String(m.memoryMiB)} MiB)`);
    if (!Number.isSafeInteger(m.diskBytes) || m.diskBytes! < MiB || m.diskBytes! > VM_LIMITS.diskGiB.max * GiB) throw bad(prefix, `gives a disk size out of range (${String(m.diskBytes)})`);
    if (typeof m.token !== "string" || !/^[A-Za-z0-9_-]{16,128}$/.test(m.token)) throw bad(prefix, "gives no valid agent secret");
    if (!Array.isArray(m.guestPorts) || m.guestPorts.length > 16 || !m.guestPorts.every((p) => Number.isInteger(p) && p >= 1 && p <= 65_535)) throw bad(prefix, "gives invalid guest ports");
    if (typeof m.ramInState !== "boolean") throw bad(prefix, "does not say where the RAM is");
    return { image: m.image, qemuBuild: m.qemuBuild, accelerator: m.accelerator, vcpus: m.vcpus, memoryMiB: m.memoryMiB, token: m.token, guestPorts: m.guestPorts, diskBytes: m.diskBytes!, ramInState: m.ramInState };
  }
}

function bad(prefix: string, what: string): ApiError {
  return new ApiError("BadGateway", `the manifest under ${prefix} in the object store ${what}: refused`, { key: prefix });
}
