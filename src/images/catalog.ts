import { stat } from "node:fs/promises";
import { ApiError } from "../errors.ts";
import type { Engine, GuestBootAssets, Snapshot } from "../vmm/engine.ts";
import { prepareBaseImage, type VmShape } from "./base-image.ts";
import { BASE_ROOTFS_RECIPE } from "./base-rootfs.ts";
import type { ImageHooks } from "./hooks.ts";
import type { ImageService } from "./service.ts";

/** What the lifecycle needs to know of an image. */
export interface ImageRef {
  imageId: string;
  name: string;
  /** The build's version (1, 2, … per name); 1 for a managed image. */
  version: number;
  /** Lifecycle hooks its VMs get (images/hooks.ts). */
  hooks?: ImageHooks;
  /** Egress connectors its VMs get when the launch names none. */
  egressConnectors?: string[];
  /** Disk size of the image's filesystem. */
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

/** A managed image: built in, shared by every tenant, always READY (AWS ListManagedMicrovmImages). */
export interface ManagedImage {
  name: string;
  version: number;
  /** When this host built it (its root filesystem). */
  createdAt: Date;
}

/**
 * The images a tenant can launch: the built-in `base` image (API.md), shared
 * by every tenant, and the tenant's own READY Dockerfile images (ImageService).
 */
export class ImageCatalog {
  private readonly base: ImageRef;

  private readonly built: ImageService | undefined;
  private readonly rootfs: string;

  constructor(engine: Engine, opts: { imagesDir: string; rootfs: string; assets: GuestBootAssets; images?: ImageService; log?: (line: string) => void }) {
    this.built = opts.images;
    this.rootfs = opts.rootfs;
    this.base = {
      imageId: "img-base",
      name: "base",
      version: 1,
      diskGiB: BASE_ROOTFS_RECIPE.diskGiB,
      snapshotFor: (shape) => prepareBaseImage(engine, { imagesDir: opts.imagesDir, rootfs: opts.rootfs, assets: opts.assets, shape, log: opts.log }),
    };
  }

  /** Finds an image by name or id (and version); another tenant's image does not exist. */
  async resolve(tenantId: string, nameOrId: string, version?: number): Promise<ImageRef> {
    if (nameOrId === this.base.name || nameOrId === this.base.imageId) {
      if (version !== undefined && version !== this.base.version) throw new ApiError("NotFound", `image base has no version ${version}`, { field: "imageVersion" });
      return this.base;
    }
    if (this.built) return this.built.resolve(tenantId, nameOrId, version);
    throw new ApiError("NotFound", `image ${nameOrId} not found`, { field: "image" });
  }

  /** The managed images every tenant can launch and build on (`FROM <name>`). */
  async managedImages(): Promise<ManagedImage[]> {
    const built = await stat(this.rootfs).then((s) => s.mtime, () => new Date(0));
    return [{ name: this.base.name, version: this.base.version, createdAt: built }];
  }
}
