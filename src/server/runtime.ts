import { join } from "node:path";
import { prepareBaseImage } from "../images/base-image.ts";
import { prepareBaseRootfs } from "../images/base-rootfs.ts";
import type { ProgressLog } from "../util/asset-cache.ts";
import { detectAccelerator } from "../vmm/accelerator.ts";
import { Engine, type GuestBootAssets, type Snapshot } from "../vmm/engine.ts";
import { prepareGuestAssets } from "../vmm/guest/index.ts";

export interface Runtime {
  engine: Engine;
  baseImage: Snapshot;
  /** The base root filesystem every image's disk is layered on. */
  rootfs: string;
  assets: GuestBootAssets;
}

/**
 * Everything the server needs before it can answer: guest assets (built once,
 * then cached), the accelerator, the engine with every surviving VM
 * re-adopted, and the built-in `base` image.
 */
export async function startRuntime(opts: {
  dataDir: string;
  assetsDir: string;
  /** Warm VMs kept per image (see Engine.launch). */
  warmPoolSize: number;
  /** QEMU processes kept started for restores (see Engine's `prestartedProcesses`); default none. */
  prestartedProcesses?: number;
  log: ProgressLog;
}): Promise<Runtime> {
  const assets = await prepareGuestAssets(opts.assetsDir, opts.log);
  const rootfs = await prepareBaseRootfs(opts.assetsDir, opts.log);
  const accelerator = await detectAccelerator({ ...assets, cacheDir: opts.assetsDir, log: opts.log });
  const engine = await Engine.open({ dataDir: opts.dataDir, assets, accelerator, warmPoolSize: opts.warmPoolSize, prestartedProcesses: opts.prestartedProcesses, log: opts.log });
  const baseImage = await prepareBaseImage(engine, { imagesDir: join(opts.dataDir, "images"), rootfs, assets, log: opts.log });
  void engine.prewarm(baseImage);
  return { engine, baseImage, rootfs, assets };
}
