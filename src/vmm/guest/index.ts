import type { ProgressLog } from "../../util/asset-cache.ts";
import { prepareAgent } from "./agent.ts";
import { prepareInitramfs } from "./initramfs.ts";
import { prepareKernel } from "./kernel.ts";

export interface GuestAssets {
  kernel: string;
  kernelRelease: string;
  initramfs: string;
  agent: string;
}

/** Builds (or finds in the cache) the kernel, agent and initramfs every VM boots with. */
export async function prepareGuestAssets(assetsDir: string, log?: ProgressLog): Promise<GuestAssets> {
  const kernel = await prepareKernel(assetsDir, log);
  const agent = await prepareAgent(assetsDir, log);
  const initramfs = await prepareInitramfs(assetsDir, kernel, agent, log);
  return { kernel: kernel.vmlinuz, kernelRelease: kernel.release, initramfs, agent };
}
