import { ApiError } from "../errors.ts";
import type { Engine, GuestBootAssets, Snapshot } from "../vmm/engine.ts";
import { prepareBaseImage, type VmShape } from "./base-image.ts";
import { managedImage, prepareManagedRootfs } from "./managed.ts";
import type { ImageService } from "./service.ts";

/** What the lifecycle needs to know of an image. */
export interface ImageRef {
  imageId: string;
  name: string;
  /** Disk size of the image's filesystem: a VM's disk is at least this, and grows to its `diskGiB`. */
  diskGiB: number;
  /** The app's port (Dockerfile EXPOSE), if the image runs an app. */
  appPort?: number;
  /** The image's ENV (Dockerfile images): the base env of every exec and of the app. */
  env?: Record<string, string>;
  /** The shape a Dockerfile image was snapshotted at: the default, and the only one it launches with. */
  shape?: VmShape;
  /** The snapshot for VMs of this shape (built once per shape, then cached; a Dockerfile image refuses another shape with a 400 naming the field). */
  snapshotFor(shape: VmShape): Promise<Snapshot>;
}

/**
 * The images a tenant can launch: the managed images (`base`, `python`,
 * `node`; API.md), shared by every tenant, and the tenant's own READY
 * Dockerfile images (ImageService). A managed image's root filesystem and
 * snapshot are built on its first launch (base's at server start), then cached.
 */
export class ImageCatalog {
  private readonly built: ImageService | undefined;

  constructor(
    private readonly engine: Engine,
    private readonly opts: { imagesDir: string; assetsDir: string; rootfs: string; assets: GuestBootAssets; images?: ImageService; log?: (line: string) => void },
  ) {
    this.built = opts.images;
  }

  /** Finds an image by name or id; another tenant's image does not exist. */
  async resolve(tenantId: string, nameOrId: string): Promise<ImageRef> {
    const managed = managedImage(nameOrId);
    if (managed) {
      const { opts } = this;
      return {
        imageId: managed.imageId,
        name: managed.name,
        diskGiB: managed.recipe.diskGiB,
        snapshotFor: async (shape) => {
          const rootfs = managed.name === "base" ? opts.rootfs : await prepareManagedRootfs(opts.assetsDir, managed.name, opts.log);
          return prepareBaseImage(this.engine, { imagesDir: opts.imagesDir, rootfs, assets: opts.assets, shape, name: managed.name, log: opts.log });
        },
      };
    }
    if (this.built) return this.built.resolve(tenantId, nameOrId);
    throw new ApiError("NotFound", `image ${nameOrId} not found`, { field: "image" });
  }
}
