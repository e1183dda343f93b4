import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { cachedAsset, type ProgressLog } from "../util/asset-cache.ts";
import { run } from "../util/process.ts";
import { ext4DiskFromTree } from "./ext4-disk.ts";

/** What the built-in `base` image is made of. Changing any of it rebuilds the disk. */
export const BASE_ROOTFS_RECIPE = {
  suite: "bookworm",
  variant: "minbase",
  include: ["ca-certificates"],
  /** Size of the ext4 filesystem; qcow2 stores only what is used. */
  diskGiB: 4,
  revision: 1,
} as const;

/**
 * Builds the `debian:bookworm` root filesystem with mmdebstrap, as ext4
 * inside qcow2 (ext4DiskFromTree). The result is
 * read-only: every image and VM disk is a copy-on-write overlay on it.
 */
export async function prepareBaseRootfs(assetsDir: string, log?: ProgressLog): Promise<string> {
  const recipe = BASE_ROOTFS_RECIPE;
  const dir = await cachedAsset({
    assetsDir,
    name: "rootfs-bookworm",
    inputs: recipe,
    log,
    build: async (out) => {
      await ext4DiskFromTree(out, recipe.diskGiB, async (tree) => {
        await run(
          "mmdebstrap",
          [`--variant=${recipe.variant}`, `--include=${recipe.include.join(",")}`, "--quiet", recipe.suite, tree],
          { onOutput: (chunk) => chunk.split("\n").filter(Boolean).forEach((l) => log?.(`mmdebstrap: ${l}`)) },
        );
        // The agent writes resolv.conf and hostname at boot; machine-id is made per VM.
        await writeFile(join(tree, "etc/hostname"), "cocoon\n");
        await writeFile(join(tree, "etc/machine-id"), "");
      });
    },
  });
  return join(dir, "disk.qcow2");
}
