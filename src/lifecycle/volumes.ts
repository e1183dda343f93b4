import { randomBytes } from "node:crypto";
import { ApiError, checkIntRange } from "../errors.ts";
import type { Db } from "../store/db.ts";
import { serialized } from "../store/locks.ts";
import type { VolumeAttachmentRow, VolumeRow } from "../store/schema.ts";
import { checkQuota } from "../store/tenants.ts";
import { VOLUME_SLOTS, type Engine, type VolumeAttachment } from "../vmm/engine.ts";
import type { Tx } from "./cluster.ts";

export const VOLUME_LIMITS = {
  /** A volume is a sparse file: its size is what it may grow to on the host's disk. */
  sizeGiB: { min: 1, max: 32 },
  /** Volumes one microVM may have (its volume slots). */
  perMicroVm: VOLUME_SLOTS,
} as const;

const NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;

/**
 * Guest directories a volume may not be mounted on or under: the guest's own
 * system (and what its agent needs to run), never a user's data.
 */
const SYSTEM_PATHS = ["/proc", "/sys", "/dev", "/run", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot"];

/** A volume asked for in a create request. */
export interface VolumeRequest {
  name: string;
  path: string;
  readOnly?: boolean;
}

/** A volume with the live attachments that hold it. */
export interface VolumeState {
  volume: VolumeRow;
  attachedTo: Pick<VolumeAttachmentRow, "microvm_id" | "path" | "read_only">[];
}

/** States of a VM that no longer holds its volumes (its process is gone for good). */
const RELEASED_STATES = ["TERMINATED", "FAILED"] as const;

/**
 * Persistent volumes (docs/volumes.md): a tenant's named disks that outlive
 * the microVMs they are attached to. The engine keeps their files; this
 * keeps who holds which. A volume is held by every attachment of a VM that
 * is neither TERMINATED nor FAILED: at most one read-write, or any number
 * read-only. Creates, deletes and the attachments of a microVM create are
 * serialized per tenant (`lock`), so two of them never both pass a check.
 */
export class VolumeService {
  constructor(
    private readonly db: Db,
    private readonly engine: Engine,
    /** On a cluster volumes are refused: a volume's file is on one host's disk. */
    private readonly clustered: boolean,
  ) {}

  /** Removes volume files no volume row names (a create or delete cut short by a crash). */
  async sweep(): Promise<void> {
    if (this.clustered) return;
    const known = new Set((await this.db.selectFrom("volumes").select("id").execute()).map((r) => r.id));
    for (const id of await this.engine.volumeIds()) if (!known.has(id)) await this.engine.deleteVolume(id);
  }

  /** Runs `fn` while no other volume create, delete or attachment of the tenant runs. */
  lock<T>(tenantId: string, fn: () => Promise<T>): Promise<T> {
    return serialized(this.db, `volumes:${tenantId}`, fn);
  }

  async create(tenantId: string, req: { name: string; sizeGiB: number }): Promise<VolumeState> {
    this.refuseOnCluster();
    if (!NAME.test(req.name)) throw new ApiError("ValidationError", `name must match ${NAME.source}, got ${JSON.stringify(req.name)}`, { field: "name" });
    checkIntRange("sizeGiB", req.sizeGiB, VOLUME_LIMITS.sizeGiB);
    return this.lock(tenantId, async () => {
      const mine = await this.db.selectFrom("volumes").select(["name", "size_gib"]).where("tenant_id", "=", tenantId).execute();
      if (mine.some((v) => v.name === req.name)) throw new ApiError("Conflict", `volume ${req.name} exists already`, { field: "name" });
      await checkQuota(this.db, tenantId, "volumes", mine.length, "volumes");
      const heldGiB = mine.reduce((sum, v) => sum + v.size_gib, 0);
      await checkQuota(this.db, tenantId, "volumeGiB", heldGiB, "GiB of volumes", req.sizeGiB);
      const volume: VolumeRow = { id: `vol-${randomBytes(6).toString("hex")}`, tenant_id: tenantId, name: req.name, size_gib: req.sizeGiB, created_at: new Date().toISOString() };
      // The file first: a crash before the row leaves a file `sweep` removes, never a row without a file.
      await this.engine.createVolume(volume.id, volume.size_gib);
      try {
        await this.db.insertInto("volumes").values(volume).execute();
      } catch (err) {
        await this.engine.deleteVolume(volume.id);
        throw err;
      }
      return { volume, attachedTo: [] };
    });
  }

  async list(tenantId: string): Promise<VolumeState[]> {
    const volumes = await this.db.selectFrom("volumes").selectAll().where("tenant_id", "=", tenantId).orderBy("name").execute();
    const held = await this.liveAttachments(this.db, volumes.map((v) => v.id));
    return volumes.map((volume) => ({ volume, attachedTo: held.filter((a) => a.volume_id === volume.id) }));
  }

  async get(tenantId: string, idOrName: string): Promise<VolumeState> {
    const volume = await this.find(tenantId, idOrName, "volume");
    return { volume, attachedTo: await this.liveAttachments(this.db, [volume.id]) };
  }

  /** Deletes a volume and its data; 409 while a microVM holds it. */
  async delete(tenantId: string, idOrName: string): Promise<VolumeState> {
    return this.lock(tenantId, async () => {
      const volume = await this.find(tenantId, idOrName, "volume");
      const held = await this.liveAttachments(this.db, [volume.id]);
      if (held.length > 0) {
        const by = held.map((a) => a.microvm_id);
        throw new ApiError("Conflict", `volume ${volume.name} is attached to ${by.join(", ")}: terminate ${by.length > 1 ? "them" : "it"} first`, { volume: volume.name, attachedTo: by });
      }
      // The row first: a crash before the file is removed leaves a file `sweep` removes.
      await this.db.deleteFrom("volume_attachments").where("volume_id", "=", volume.id).execute();
      await this.db.deleteFrom("volumes").where("id", "=", volume.id).execute();
      await this.engine.deleteVolume(volume.id);
      return { volume, attachedTo: [] };
    });
  }

  /**
   * Checks the volumes of a create request and finds them: at most
   * VOLUME_SLOTS, each once, at distinct mount points that are clean
   * absolute paths outside the guest's system directories. Another tenant's
   * volume is not found. The engine's attachments, in slot order.
   */
  async resolve(tenantId: string, requests: VolumeRequest[]): Promise<(VolumeAttachment & { name: string })[]> {
    if (requests.length === 0) return [];
    this.refuseOnCluster();
    if (requests.length > VOLUME_LIMITS.perMicroVm) {
      throw new ApiError("ValidationError", `volumes holds at most ${VOLUME_LIMITS.perMicroVm} entries, got ${requests.length}`, { field: "volumes" });
    }
    const resolved: (VolumeAttachment & { name: string })[] = [];
    for (const [i, req] of requests.entries()) {
      checkGuestPath(req.path, `volumes[${i}].path`);
      if (requests.findIndex((r) => r.name === req.name) !== i) throw new ApiError("ValidationError", `volumes[${i}].name: volume ${req.name} is given twice`, { field: `volumes[${i}].name` });
      const other = requests.findIndex((r) => overlaps(r.path, req.path));
      if (other !== i) throw new ApiError("ValidationError", `volumes[${i}].path ${req.path} overlaps volumes[${other}].path ${requests[other]!.path}`, { field: `volumes[${i}].path` });
      const volume = await this.find(tenantId, req.name, `volumes[${i}].name`);
      resolved.push({ volumeId: volume.id, name: volume.name, path: req.path, readOnly: req.readOnly === true });
    }
    return resolved;
  }

  /**
   * Records `attachments` for `microVmId` in `tx` (with its PENDING row),
   * after checking no live attachment conflicts: a read-write one wants the
   * volume to itself, a read-only one wants no writer. Called under `lock`.
   */
  async attach(tx: Tx, tenantId: string, microVmId: string, attachments: (VolumeAttachment & { name: string })[]): Promise<void> {
    if (attachments.length === 0) return;
    // Found before the lock was taken: a delete may have come in between.
    const still = new Set((await tx.selectFrom("volumes").select("id").where("id", "in", attachments.map((a) => a.volumeId)).execute()).map((r) => r.id));
    const gone = attachments.findIndex((a) => !still.has(a.volumeId));
    if (gone >= 0) throw new ApiError("NotFound", `volume ${attachments[gone]!.name} not found`, { field: `volumes[${gone}].name` });
    const held = await this.liveAttachments(tx, attachments.map((a) => a.volumeId));
    for (const [slot, a] of attachments.entries()) {
      const others = held.filter((h) => h.volume_id === a.volumeId);
      const writer = others.find((h) => !h.read_only);
      if (writer || (!a.readOnly && others.length > 0)) {
        const by = (writer ? [writer] : others).map((h) => h.microvm_id);
        const how = writer ? "read-write" : "read-only";
        throw new ApiError("Conflict", `volume ${a.name} is attached ${how} to ${by.join(", ")}: one read-write attachment at a time, or any number read-only`, {
          field: `volumes[${slot}]`,
          volume: a.name,
          attachedTo: by,
        });
      }
    }
    await tx
      .insertInto("volume_attachments")
      .values(attachments.map((a, slot) => ({ volume_id: a.volumeId, microvm_id: microVmId, tenant_id: tenantId, slot, path: a.path, read_only: a.readOnly ? 1 : 0 })))
      .execute();
  }

  /** The volumes attached to a microVM, in slot order (names for messages). */
  async ofMicroVm(microVmId: string): Promise<{ name: string; path: string; readOnly: boolean }[]> {
    const rows = await this.db
      .selectFrom("volume_attachments as a")
      .innerJoin("volumes as v", "v.id", "a.volume_id")
      .select(["v.name", "a.path", "a.read_only"])
      .where("a.microvm_id", "=", microVmId)
      .orderBy("a.slot")
      .execute();
    return rows.map((r) => ({ name: r.name, path: r.path, readOnly: r.read_only === 1 }));
  }

  private async find(tenantId: string, idOrName: string, field: string): Promise<VolumeRow> {
    const volume = await this.db
      .selectFrom("volumes")
      .selectAll()
      .where("tenant_id", "=", tenantId)
      .where((eb) => eb.or([eb("id", "=", idOrName), eb("name", "=", idOrName)]))
      .executeTakeFirst();
    if (!volume) throw new ApiError("NotFound", `volume ${idOrName} not found`, { field });
    return volume;
  }

  /** Attachments of VMs that still hold their volumes. */
  private liveAttachments(db: Db | Tx, volumeIds: string[]): Promise<(Pick<VolumeAttachmentRow, "volume_id" | "microvm_id" | "path" | "read_only">)[]> {
    if (volumeIds.length === 0) return Promise.resolve([]);
    return db
      .selectFrom("volume_attachments as a")
      .innerJoin("microvms as m", "m.id", "a.microvm_id")
      .select(["a.volume_id", "a.microvm_id", "a.path", "a.read_only"])
      .where("a.volume_id", "in", volumeIds)
      .where("m.state", "not in", [...RELEASED_STATES])
      .orderBy("a.microvm_id")
      .execute();
  }

  private refuseOnCluster(): void {
    if (this.clustered) throw new ApiError("Conflict", "volumes are kept on one host's disk and are not available on a cluster (docs/volumes.md)", { field: "volumes" });
  }
}

/** Refuses a mount point that is not a clean absolute path, is "/", or is in or under a system directory. */
function checkGuestPath(path: string, field: string): void {
  const clean = path.startsWith("/") && path.length <= 256 && !/\/\/|\/\.{1,2}(\/|$)|\/$|\0/.test(path);
  if (!clean || path === "/") {
    throw new ApiError("ValidationError", `${field} must be a clean absolute path other than / (at most 256 characters), got ${JSON.stringify(path)}`, { field });
  }
  const system = SYSTEM_PATHS.find((p) => path === p || path.startsWith(`${p}/`));
  if (system) throw new ApiError("ValidationError", `${field} ${path} is in the guest's system directory ${system}`, { field });
}

const overlaps = (a: string, b: string) => a === b || a.startsWith(`${b}/`) || b.startsWith(`${a}/`);
