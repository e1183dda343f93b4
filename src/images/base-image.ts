import { assetKey, cachedAsset, type ProgressLog } from "../util/asset-cache.ts";
import { SNAPSHOT_FORMAT, VM_LIMITS, type Engine, type GuestBootAssets, type Snapshot } from "../vmm/engine.ts";
import type { ClusterSnapshots } from "./cluster-snapshots.ts";
import { managedImage } from "./managed.ts";
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
  opts: {
    imagesDir: string;
    rootfs: string;
    assets: GuestBootAssets;
    shape?: VmShape;
    name?: string;
    log?: ProgressLog;
    /** Cluster with an object store: built once per cluster, pulled by the other nodes. */
    shared?: ClusterSnapshots;
  },
): Promise<Snapshot> {
  const shape = opts.shape ?? DEFAULT_SHAPE;
  const name = opts.name ?? "base";
  const inputs = {
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
  };
  const coldBoot = async (dir: string) => engine.snapshot(await engine.bootTemplate({ dir, backingDisk: opts.rootfs, ...shape }));
  const diskGiB = managedImage(name)?.recipe.diskGiB ?? VM_LIMITS.diskGiB.max;
  const dir = await cachedAsset({
    assetsDir: opts.imagesDir,
    name,
    inputs,
    log: opts.log,
    build: async (dir) => {
      if (opts.shared) await opts.shared.build({ name, key: assetKey(inputs), ...shape, diskGiB }, dir, coldBoot);
      else await coldBoot(dir);
    },
  });
  return engine.loadSnapshot(dir);
}
