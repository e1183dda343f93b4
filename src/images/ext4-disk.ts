import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { run } from "../util/process.ts";
import { qemuInstall } from "../vmm/qemu.ts";

/**
 * Writes `<out>/disk.qcow2`: an ext4 filesystem of `diskGiB` made with
 * `mke2fs -d` from a directory tree that `fill` populates (no mount, no loop
 * device, no root needed for the filesystem itself). The tree and the raw
 * image are removed whatever happens. `inodes`: at least this many (a tree
 * of many small files).
 */
export async function ext4DiskFromTree(out: string, diskGiB: number, fill: (tree: string) => Promise<void>, opts: { inodes?: number } = {}): Promise<string> {
  const tree = join(out, "tree");
  const raw = join(out, "disk.raw");
  const disk = join(out, "disk.qcow2");
  try {
    await mkdir(tree, { recursive: true });
    await fill(tree);
    // mke2fs's default is one inode per 16 KiB: enough unless a tree holds very many small files.
    const inodes = opts.inodes && opts.inodes > (diskGiB * 2 ** 30) / 16384 ? ["-N", String(opts.inodes)] : [];
    await run("mke2fs", ["-q", "-t", "ext4", "-L", "cocoon-root", ...inodes, "-d", tree, raw, `${diskGiB}G`]);
    await run(qemuInstall().img, ["convert", "-O", "qcow2", raw, disk]);
  } finally {
    await rm(tree, { recursive: true, force: true });
    await rm(raw, { force: true });
  }
  return disk;
}
