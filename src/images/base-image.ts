import { cachedAsset, type ProgressLog } from "../util/asset-cache.ts";
import { Engine, type GuestBootAssets, type Snapshot } from "../vmm/engine.ts";

/** Size of the built-in `base` image's VMs (clones inherit the snapshot's size). */
export const BASE_IMAGE_SHAPE = { vcpus: 1, memoryMiB: 512 } as const;

/**
 * The built-in `base` image: the bookworm root filesystem booted once with the
 * agent, then snapshotted. Rebuilt when the disk, kernel, initramfs or
 * accelerator changes.
 */
export async function prepareBaseImage(
  engine: Engine,
  opts: { imagesDir: string; rootfs: string; assets: GuestBootAssets; log?: ProgressLog },
): Promise<Snapshot> {
  const dir = await cachedAsset({
    assetsDir: opts.imagesDir,
    name: "base",
    inputs: { rootfs: opts.rootfs, ...opts.assets, accelerator: engine.accelerator, ...BASE_IMAGE_SHAPE },
    log: opts.log,
    build: async (dir) => {
      const template = await engine.bootTemplate({ dir, backingDisk: opts.rootfs, ...BASE_IMAGE_SHAPE });
      await engine.snapshot(template);
    },
  });
  return Engine.loadSnapshot(dir);
}
