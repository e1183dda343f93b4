import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { cachedAsset, type ProgressLog } from "../util/asset-cache.ts";
import { ext4DiskFromTree } from "./ext4-disk.ts";

/** Size of the scratch image's filesystem. */
export const SCRATCH_DISK_GIB = 4;

/**
 * The disk of `FROM scratch`: an empty ext4 filesystem holding only the
 * mount points the agent needs (/dev, /proc, /sys, /tmp, /run) and a root
 * user, so COPY'd static binaries can run. Built once, cached by recipe.
 */
export async function prepareScratchDisk(assetsDir: string, log?: ProgressLog): Promise<string> {
  const recipe = { diskGiB: SCRATCH_DISK_GIB, revision: 1 };
  const dir = await cachedAsset({
    assetsDir,
    name: "rootfs-scratch",
    inputs: recipe,
    log,
    build: async (out) => {
      await ext4DiskFromTree(out, recipe.diskGiB, async (tree) => {
        for (const d of ["dev", "proc", "sys", "tmp", "run", "etc", "root"]) await mkdir(join(tree, d), { recursive: true });
        await writeFile(join(tree, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
        await writeFile(join(tree, "etc/group"), "root:x:0:\n");
      });
    },
  });
  return join(dir, "disk.qcow2");
}
