import { ApiError } from "../errors.ts";
import type { Engine, GuestBootAssets } from "../vmm/engine.ts";
import { DEFAULT_SHAPE, prepareBaseImage, type VmShape } from "./base-image.ts";
import type { Db } from "../store/db.ts";
import { checkQuota } from "../store/tenants.ts";
import { serialized } from "../store/locks.ts";
import type { ClusterSnapshots } from "./cluster-snapshots.ts";
import { MANAGED_VERSION, managedImage, managedImages, prepareManagedRootfs, type ManagedImageView } from "./managed.ts";
import type { ImageRef, ImageService } from "./service.ts";

/**
 * The images a tenant can launch: the managed images (`base`, `python`,
 * `node`; docs/api.md), shared by every tenant, and the tenant's own READY
 * Dockerfile images (ImageService). A managed image's root filesystem and
 * snapshot are built on its first launch (base's at server start), then cached.
 */
export class ImageCatalog {
  /** The tenants' Dockerfile images, when this server builds them. */
  readonly built: ImageService | undefined;

  constructor(
    private readonly engine: Engine,
    private readonly opts: {
      db: Db;
      imagesDir: string;
      assetsDir: string;
      rootfs: string;
      assets: GuestBootAssets;
      images?: ImageService;
      /** Cluster with an object store: managed snapshots are built once per cluster. */
      shared?: ClusterSnapshots;
      log?: (line: string) => void;
    },
  ) {
    this.built = opts.images;
  }

  /** Host capacity that image builds take now (their build VMs): admission counts it beside the microVMs. */
  buildsInFlight(): VmShape {
    return this.built?.buildsInFlight() ?? { vcpus: 0, memoryMiB: 0 };
  }

  /**
   * A shape of a managed image beyond its default is snapshotted once (a
   * cold boot) and kept: the first tenant to ask for one is charged with it
   * (quota baseShapes), checked and recorded in one step.
   */
  private async chargeShape(tenantId: string, name: string, shape: VmShape): Promise<void> {
    if (shape.vcpus === DEFAULT_SHAPE.vcpus && shape.memoryMiB === DEFAULT_SHAPE.memoryMiB) return;
    const { db } = this.opts;
    await serialized(db, `base-shapes:${tenantId}`, async () => {
      const known = await db.selectFrom("base_shapes").select("tenant_id").where("image_name", "=", name).where("vcpus", "=", shape.vcpus).where("memory_mib", "=", shape.memoryMiB).executeTakeFirst();
      if (known) return;
      const held = await db.selectFrom("base_shapes").select((eb) => eb.fn.countAll<number>().as("n")).where("tenant_id", "=", tenantId).executeTakeFirst();
      await checkQuota(db, tenantId, "baseShapes", Number(held?.n ?? 0), `new shapes of managed images (each a snapshot kept on the host; ${DEFAULT_SHAPE.vcpus} vCPU and ${DEFAULT_SHAPE.memoryMiB} MiB is free)`);
      await db
        .insertInto("base_shapes")
        .values({ image_name: name, vcpus: shape.vcpus, memory_mib: shape.memoryMiB, tenant_id: tenantId, created_at: new Date().toISOString() })
        .onConflict((oc) => oc.doNothing())
        .execute();
    });
  }

  /** Finds an image by name or id (and version); another tenant's image does not exist. */
  async resolve(tenantId: string, nameOrId: string, version?: number): Promise<ImageRef> {
    const managed = managedImage(nameOrId);
    if (managed) {
      if (version !== undefined && version !== MANAGED_VERSION) throw new ApiError("NotFound", `image ${managed.name} has no version ${version}`, { field: "imageVersion" });
      const { opts } = this;
      return {
        imageId: managed.imageId,
        name: managed.name,
        version: MANAGED_VERSION,
        diskGiB: managed.recipe.diskGiB,
        snapshotFor: async (shape) => {
          await this.chargeShape(tenantId, managed.name, shape);
          const rootfs = managed.name === "base" ? opts.rootfs : await prepareManagedRootfs(opts.assetsDir, managed.name, opts.log, opts.shared);
          return prepareBaseImage(this.engine, { imagesDir: opts.imagesDir, rootfs, assets: opts.assets, shape, name: managed.name, shared: opts.shared, log: opts.log });
        },
      };
    }
    if (this.built) return this.built.resolve(tenantId, nameOrId, version);
    throw new ApiError("NotFound", `image ${nameOrId} not found`, { field: "image" });
  }

  /** The managed images every tenant can launch and build on (`FROM <name>`). */
  managedImages(): ManagedImageView[] {
    return managedImages();
  }
}
