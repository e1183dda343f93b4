import type { ProgressLog } from "../util/asset-cache.ts";
import { BASE_ROOTFS_RECIPE, prepareDebianRootfs, type DebianRecipe } from "./base-rootfs.ts";
import type { ClusterSnapshots } from "./cluster-snapshots.ts";
import type { ManagedName } from "./dockerfile.ts";

/** An image Cocoon builds from Debian packages: always READY, shared by every tenant, launchable and usable as FROM by name. */
export interface ManagedImage {
  name: ManagedName;
  imageId: string;
  description: string;
  recipe: DebianRecipe;
}

/** A managed image has one version: its current recipe. */
export const MANAGED_VERSION = 1;

/** When the managed images' current recipes were released: their `createdAt`. */
const RELEASED_AT = "2026-11-24T00:00:00.000Z";

/** The managed images, in the order they are listed. */
export const MANAGED_IMAGES: readonly ManagedImage[] = [
  { name: "base", imageId: "img-base", description: "Debian 12 (bookworm) with python3 and the Cocoon agent; no app", recipe: BASE_ROOTFS_RECIPE },
  {
    name: "python",
    imageId: "img-python",
    description: "Debian 12 with Debian's python3, pip and venv",
    recipe: { ...BASE_ROOTFS_RECIPE, name: "rootfs-python", include: [...BASE_ROOTFS_RECIPE.include, "python3-pip", "python3-venv"], revision: 1 },
  },
  {
    name: "node",
    imageId: "img-node",
    description: "Debian 12 with Debian's nodejs and npm",
    recipe: { ...BASE_ROOTFS_RECIPE, name: "rootfs-node", include: [...BASE_ROOTFS_RECIPE.include, "nodejs", "npm"], revision: 1 },
  },
];

/** A managed image by name or id, or undefined. */
export function managedImage(nameOrId: string): ManagedImage | undefined {
  return MANAGED_IMAGES.find((m) => m.name === nameOrId || m.imageId === nameOrId);
}

/** What GET /v1/images (and the AWS API's ListManagedMicrovmImages) shows of a managed image: always READY. */
export interface ManagedImageView {
  imageId: string;
  name: string;
  version: typeof MANAGED_VERSION;
  managed: true;
  state: "READY";
  createdAt: string;
  description: string;
  diskGiB: number;
  /** Debian packages on top of a bookworm minbase. */
  packages: string[];
}

/** The managed images as the API lists them (a pure function of the recipes: nothing is built to list them). */
export function managedImages(): ManagedImageView[] {
  return MANAGED_IMAGES.map(managedImageView);
}

export function managedImageView(m: ManagedImage): ManagedImageView {
  return {
    imageId: m.imageId,
    name: m.name,
    version: MANAGED_VERSION,
    managed: true,
    state: "READY",
    createdAt: RELEASED_AT,
    description: m.description,
    diskGiB: m.recipe.diskGiB,
    packages: [...m.recipe.include],
  };
}

/**
 * The root filesystem of a managed image, built on first use (mmdebstrap,
 * 20–60 s; once per cluster with `shared`) and cached by recipe; `base`'s
 * is built at server start.
 */
export function prepareManagedRootfs(assetsDir: string, name: ManagedName, log?: ProgressLog, shared?: ClusterSnapshots): Promise<string> {
  return prepareDebianRootfs(assetsDir, MANAGED_IMAGES.find((m) => m.name === name)!.recipe, log, shared);
}
