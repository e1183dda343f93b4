import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import type { TestProject } from "vitest/node";
import { prepareBaseImage } from "../../src/images/base-image.ts";
import { prepareBaseRootfs } from "../../src/images/base-rootfs.ts";
import { detectAccelerator } from "../../src/vmm/accelerator.ts";
import { Engine } from "../../src/vmm/engine.ts";
import { prepareGuestAssets } from "../../src/vmm/guest/index.ts";
import { TEST_ASSETS, TEST_IMAGES, TEST_ROOT } from "./paths.ts";

declare module "vitest" {
  export interface ProvidedContext {
    kernel: string;
    initramfs: string;
    accelerator: "kvm" | "tcg";
    baseSnapshotDir: string;
    rootfs: string;
  }
}

/** Builds (or reuses) the guest assets and the base snapshot once for the whole run. */
export default async function setup(project: TestProject): Promise<void> {
  const log = (line: string) => console.log(`[setup] ${line}`);
  await mkdir(TEST_ROOT, { recursive: true });
  const assets = await prepareGuestAssets(TEST_ASSETS, log);
  const rootfs = await prepareBaseRootfs(TEST_ASSETS, log);
  const accelerator = await detectAccelerator({ ...assets, cacheDir: TEST_ASSETS, log });
  const dataDir = await mkdtemp(join(TEST_ROOT, "setup-"));
  try {
    const engine = await Engine.open({ dataDir, assets, accelerator, log });
    const base = await prepareBaseImage(engine, { imagesDir: TEST_IMAGES, rootfs, assets, log });
    project.provide("baseSnapshotDir", base.dir);
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
  project.provide("kernel", assets.kernel);
  project.provide("initramfs", assets.initramfs);
  project.provide("accelerator", accelerator);
  project.provide("rootfs", rootfs);
}
