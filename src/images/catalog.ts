import { ApiError } from "../errors.ts";
import type { Engine, GuestBootAssets, Snapshot } from "../vmm/engine.ts";
import { prepareBaseImage, type VmShape } from "./base-image.ts";
import { BASE_ROOTFS_RECIPE } from "./base-rootfs.ts";

/** What the lifecycle needs to know of an image. */
export interface ImageRef {
  imageId: string;
  name: string;
  /** Disk size of the image's filesystem. */
  diskGiB: number;
  /** The app's port (Dockerfile EXPOSE), if the image runs an app. */
  appPort?: number;
  /** The snapshot for VMs of this shape (built once per shape, then cached). */
  snapshotFor(shape: VmShape): Promise<Snapshot>;
}

/**
 * The images a tenant can launch. For now only the built-in `base` image
 * (API.md), shared by every tenant; images built from Dockerfiles come next.
 */
export class ImageCatalog {
  private readonly base: ImageRef;

  constructor(engine: Engine, opts: { imagesDir: string; rootfs: string; assets: GuestBootAssets; log?: (line: string) => void }) {
    this.base = {
      imageId: "img-base",
      name: "base",
      diskGiB: BASE_ROOTFS_RECIPE.diskGiB,
      snapshotFor: (shape) => prepareBaseImage(engine, { imagesDir: opts.imagesDir, rootfs: opts.rootfs, assets: opts.assets, shape, log: opts.log }),
    };
  }

  /** Finds an image by name or id; another tenant's image does not exist. */
  resolve(_tenantId: string, nameOrId: string): ImageRef {
    if (nameOrId === this.base.name || nameOrId === this.base.imageId) return this.base;
    throw new ApiError("NotFound", `image ${nameOrId} not found`, { field: "image" });
  }
}
