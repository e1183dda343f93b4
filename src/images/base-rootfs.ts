import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { assetKey, cachedAsset, type ProgressLog } from "../util/asset-cache.ts";
import { run } from "../util/process.ts";
import type { ClusterSnapshots } from "./cluster-snapshots.ts";
import { ext4DiskFromTree } from "./ext4-disk.ts";

/** A Debian root filesystem Cocoon builds itself: a bookworm minbase plus packages. Changing any field rebuilds the disk. */
export interface DebianRecipe {
  /** The asset's name under the assets directory. */
  name: string;
  suite: "bookworm";
  variant: "minbase";
  include: readonly string[];
  /** Size of the ext4 filesystem; qcow2 stores only what is used. */
  diskGiB: number;
  revision: number;
}

/**
 * The built-in `base` image (and `FROM debian:bookworm`): Debian with
 * python3, because the first thing an AI coding assistant runs in a sandbox
 * is usually `python3 -c …`; pip and venv are the `python` image's.
 */
export const BASE_ROOTFS_RECIPE: DebianRecipe = {
  name: "rootfs-bookworm",
  suite: "bookworm",
  variant: "minbase",
  include: ["ca-certificates", "python3"],
  diskGiB: 4,
  revision: 2,
};

/** The `base` root filesystem: built once (per cluster, with `shared`), then cached by recipe. */
export function prepareBaseRootfs(assetsDir: string, log?: ProgressLog, shared?: ClusterSnapshots): Promise<string> {
  return prepareDebianRootfs(assetsDir, BASE_ROOTFS_RECIPE, log, shared);
}

/**
 * Builds a Debian root filesystem with mmdebstrap, as ext4 inside qcow2
 * (ext4DiskFromTree), cached by recipe. The result is read-only: every image
 * and VM disk is a copy-on-write overlay on it.
 */
export async function prepareDebianRootfs(assetsDir: string, recipe: DebianRecipe, log?: ProgressLog, shared?: ClusterSnapshots): Promise<string> {
  const inputs = recipe as unknown as Record<string, unknown>;
  const build = async (out: string) => {
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
  };
  const dir = await cachedAsset({
    assetsDir,
    name: recipe.name,
    inputs,
    log,
    // A qcow2 holds at most its filesystem and its metadata.
    build: shared ? (out) => shared.rootfs({ name: recipe.name, key: assetKey(inputs), maxBytes: recipe.diskGiB * 1.1 * 2 ** 30 + 64 * 2 ** 20 }, out, build) : build,
  });
  return join(dir, "disk.qcow2");
}
