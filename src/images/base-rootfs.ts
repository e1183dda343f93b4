import { rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { cachedAsset, type ProgressLog } from "../util/asset-cache.ts";
import { run } from "../util/process.ts";

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
 * Builds the `debian:bookworm` root filesystem with mmdebstrap, as ext4 made
 * with `mke2fs -d` (no mount, no loop device) inside qcow2. The result is
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
      const tree = join(out, "tree");
      const raw = join(out, "disk.raw");
      try {
        await run(
          "mmdebstrap",
          [`--variant=${recipe.variant}`, `--include=${recipe.include.join(",")}`, "--quiet", recipe.suite, tree],
          { onOutput: (chunk) => chunk.split("\n").filter(Boolean).forEach((l) => log?.(`mmdebstrap: ${l}`)) },
        );
        // The agent writes resolv.conf and hostname at boot; machine-id is made per VM.
        await writeFile(join(tree, "etc/hostname"), "cocoon\n");
        await writeFile(join(tree, "etc/machine-id"), "");
        await run("mke2fs", ["-q", "-t", "ext4", "-L", "cocoon-root", "-d", tree, raw, `${recipe.diskGiB}G`]);
        await run("qemu-img", ["convert", "-O", "qcow2", raw, join(out, "disk.qcow2")]);
      } finally {
        await rm(tree, { recursive: true, force: true });
        await rm(raw, { force: true });
      }
    },
  });
  return join(dir, "disk.qcow2");
}
