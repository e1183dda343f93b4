import { cachedAsset, type ProgressLog } from "../util/asset-cache.ts";
import { SNAPSHOT_FORMAT, type Engine, type GuestBootAssets, type Snapshot } from "../vmm/engine.ts";
import { qemuBuild } from "../vmm/snapshot.ts";
import { guestCmdline, qemuFeatures } from "../vmm/qemu.ts";

/** vCPUs and memory of a snapshot; every clone of it has the same. */
export interface VmShape {
  vcpus: number;
  memoryMiB: number;
}

/** The shape of VMs created without one (docs/api.md defaults). */
export const DEFAULT_SHAPE: VmShape = { vcpus: 1, memoryMiB: 512 };

/**
 * A managed image (`base` by default, `python`, `node`): its root filesystem
 * booted once with the agent, then snapshotted, one snapshot per VM shape
 * (memory size and vCPUs are fixed in a snapshot). Rebuilt when the disk,
 * kernel, initramfs, accelerator or QEMU build (or what is used of it) changes.
 */
export async function prepareBaseImage(
  engine: Engine,
  opts: { imagesDir: string; rootfs: string; assets: GuestBootAssets; shape?: VmShape; name?: string; log?: ProgressLog },
): Promise<Snapshot> {
  const shape = opts.shape ?? DEFAULT_SHAPE;
  const dir = await cachedAsset({
    assetsDir: opts.imagesDir,
    name: opts.name ?? "base",
    inputs: {
      rootfs: opts.rootfs,
      kernel: opts.assets.kernel,
      initramfs: opts.assets.initramfs,
      accelerator: engine.accelerator,
      vcpus: shape.vcpus,
      memoryMiB: shape.memoryMiB,
      snapshotFormat: SNAPSHOT_FORMAT,
      qemu: qemuBuild(),
      // What the engine uses of that build: it decides how the snapshot is made (its memory file's mode).
      qemuFeatures: qemuFeatures(),
      // The guest kernel booted with it (nowatchdog, ...): the snapshot keeps that kernel's state.
      cmdline: guestCmdline({ accelerator: engine.accelerator, hostname: "" }),
    },
    log: opts.log,
    build: async (dir) => {
      const template = await engine.bootTemplate({ dir, backingDisk: opts.rootfs, ...shape });
      await engine.snapshot(template);
    },
  });
  return engine.loadSnapshot(dir);
}
