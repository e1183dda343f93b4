import { randomBytes } from "node:crypto";
import { ApiError } from "../errors.ts";
import type { ObjectFile, ObjectStore } from "../store/objects.ts";
import type { MicroVmRow } from "../store/schema.ts";
import { VM_LIMITS } from "../vmm/engine.ts";
import { qemuBuild } from "../vmm/snapshot.ts";

/** What a published suspend says besides its files (its manifest's `meta`); read back as untrusted. */
export interface SuspendedMeta {
  vm: string;
  /** The QEMU build and accelerator that wrote the state: it restores only into the same. */
  qemuBuild: string;
  accelerator: string;
  diskBytes: number;
  /** The agent secret the guest held when suspended (the resume re-keys it). */
  token: string;
  guestPorts: number[];
  /** The disk overlay's backing chain, nearest first, as blobs (`ObjectStore.putBlob`). */
  layers: ObjectFile[];
}

const GiB = 2 ** 30;
const MiB = 2 ** 20;

/**
 * Suspended VMs in the cluster's object store (docs/cluster.md): a suspend
 * is published as a bundle under `microvms/<id>/<random>/` (its device
 * state and RAM, its disk overlay, then the manifest), with the layers under
 * the overlay as content-addressed blobs that many VMs share; a node that
 * did not suspend the VM fetches it from there, every file checked against
 * the manifest and every field of the manifest against the VM's row.
 */
export class SuspendedObjects {
  constructor(
    readonly store: ObjectStore,
    private readonly opts: { /** The node's cache of fetched layers. */ blobsDir: string; accelerator: string },
  ) {}

  /** Uploads a suspended VM's files, the manifest last; returns the prefix it is published under and the bytes uploaded. */
  async publish(id: string, files: { state: string; disk: string; backing: string[]; guestPorts: number[]; diskBytes: number; token: string }): Promise<{ prefix: string; manifestSha256: string; bytes: number }> {
    const prefix = `microvms/${id}/${randomBytes(8).toString("hex")}`;
    const meta: Omit<SuspendedMeta, "layers"> = { vm: id, qemuBuild: qemuBuild(), accelerator: this.opts.accelerator, diskBytes: files.diskBytes, token: files.token, guestPorts: files.guestPorts };
    const manifest = await this.store.publishLayered(prefix, { state: files.state, disk: files.disk }, files.backing, meta);
    return { prefix, manifestSha256: manifest.sha256, bytes: Object.values(manifest.files).reduce((n, f) => n + f.bytes, 0) };
  }

  /**
   * Downloads the suspend `row.suspended_object` names (its manifest the one
   * whose sha256 is `row.suspended_manifest`) into `dir` (`state`,
   * `disk`) and its layers into the node's cache; returns the checked meta
   * and the layers' local paths. Refused (BadGateway) when the store holds
   * something the row does not allow: files larger than the VM's memory and
   * disk can make, another VM's bundle, fields out of range.
   */
  async fetch(row: MicroVmRow, dir: string): Promise<{ meta: Omit<SuspendedMeta, "layers">; layers: string[] }> {
    const prefix = row.suspended_object;
    if (!prefix || !row.suspended_manifest) throw new ApiError("Conflict", `microVM ${row.id} has no published suspend`);
    const limits = fileLimits(row);
    // Pinned by the row: the bundle is the one this cluster published, whoever else can write the bucket.
    const { meta, layers } = await this.store.fetchLayered(prefix, dir, {
      limits: { state: limits.stateBytes, disk: limits.diskBytes },
      sha256: row.suspended_manifest,
      blobsDir: this.opts.blobsDir,
      layerMaxBytes: limits.diskBytes,
      check: (raw) => {
        const meta = checkMeta(raw, row, prefix);
        if (meta.qemuBuild !== qemuBuild() || meta.accelerator !== this.opts.accelerator) {
          throw new ApiError("Conflict", `microVM ${row.id} was suspended by "${meta.qemuBuild}" under ${meta.accelerator}; this node runs "${qemuBuild()}" under ${this.opts.accelerator}`, { node: row.suspended_node });
        }
        return meta;
      },
    });
    return { meta, layers };
  }

  /** Removes a published suspend (the VM resumed, or ended): its manifest first. Shared layers stay. */
  async remove(prefix: string): Promise<void> {
    await this.store.deletePrefix(prefix);
  }
}

/**
 * What a VM's suspend can weigh: its RAM in the state (plus QEMU's per-page
 * headers and device state), its overlay up to its disk size (plus qcow2
 * metadata). Anything larger in a manifest is refused unread.
 */
function fileLimits(row: MicroVmRow): { stateBytes: number; diskBytes: number } {
  return { stateBytes: Math.ceil(row.memory_mib * MiB * 1.05) + 64 * MiB, diskBytes: Math.ceil(row.disk_gib * GiB * 1.1) + 64 * MiB };
}

function checkMeta(raw: unknown, row: MicroVmRow, prefix: string): Omit<SuspendedMeta, "layers"> {
  const bad = (what: string) => new ApiError("BadGateway", `the manifest under ${prefix} in the object store ${what}: refused`, { key: prefix });
  const m = raw as Partial<SuspendedMeta> | null;
  if (!m || typeof m !== "object") throw bad("has no meta");
  if (m.vm !== row.id) throw bad(`is for another microVM (${String(m.vm)})`);
  if (typeof m.qemuBuild !== "string" || m.qemuBuild.length > 256 || typeof m.accelerator !== "string" || m.accelerator.length > 16) throw bad("names no valid QEMU build and accelerator");
  if (!Number.isSafeInteger(m.diskBytes) || m.diskBytes! < MiB || m.diskBytes! > VM_LIMITS.diskGiB.max * GiB) throw bad(`gives a disk size out of range (${String(m.diskBytes)})`);
  if (typeof m.token !== "string" || !/^[A-Za-z0-9_-]{16,128}$/.test(m.token)) throw bad("gives no valid agent secret");
  if (!Array.isArray(m.guestPorts) || m.guestPorts.length > 16 || !m.guestPorts.every((p) => Number.isInteger(p) && p >= 1 && p <= 65_535)) throw bad("gives invalid guest ports");
  return { vm: m.vm, qemuBuild: m.qemuBuild, accelerator: m.accelerator, diskBytes: m.diskBytes!, token: m.token, guestPorts: m.guestPorts };
}
