import { ApiError } from "../errors.ts";
import type { Engine, GuestBootAssets, Snapshot } from "../vmm/engine.ts";
import { prepareBaseImage, type VmShape } from "./base-image.ts";
import type { ImageHooks } from "./hooks.ts";
import { MANAGED_VERSION, managedImage, managedImages, prepareManagedRootfs, type ManagedImageView } from "./managed.ts";
import type { ImageService } from "./service.ts";

/** What the lifecycle needs to know of an image. */
export interface ImageRef {
  imageId: string;
  name: string;
  /** The build's version (1, 2, … per name); MANAGED_VERSION for a managed image. */
  version: number;
  /** Lifecycle hooks its VMs get (images/hooks.ts). */
  hooks?: ImageHooks;
  /** Egress connectors its VMs get when the launch names none. */
  egressConnectors?: string[];
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
          const rootfs = managed.name === "base" ? opts.rootfs : await prepareManagedRootfs(opts.assetsDir, managed.name, opts.log);
          return prepareBaseImage(this.engine, { imagesDir: opts.imagesDir, rootfs, assets: opts.assets, shape, name: managed.name, log: opts.log });
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
