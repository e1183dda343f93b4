import { mkdir, mkdtemp, readdir, rm, utimes, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ImageCache, pickEvictions } from "../../src/images/image-cache.ts";

const MiB = 2 ** 20;
const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

describe("the cache of pulled images (LRU, bounded by size)", () => {
  it("evicts least recently used first, down to the bound, never an image in use", () => {
    const image = (id: string, bytes: number, lastUsedMs: number, inUse = false) => ({ id, bytes, lastUsedMs, inUse });
    expect(pickEvictions([image("a", 10, 1), image("b", 10, 2)], 20)).toEqual([]);
    expect(pickEvictions([image("new", 10, 3), image("old", 10, 1), image("mid", 10, 2)], 15)).toEqual(["old", "mid"]);
    // The oldest is in use: the next oldest goes instead, and the cache may stay over its bound rather than evict one in use.
    expect(pickEvictions([image("old", 10, 1, true), image("mid", 10, 2), image("new", 10, 3)], 15)).toEqual(["mid", "new"]);
    expect(pickEvictions([image("a", 10, 1, true), image("b", 10, 2, true)], 5)).toEqual([]);
    expect(pickEvictions([], 0)).toEqual([]);
  });

  it("removes pulled images past the bound and deleted ones, keeps those VMs stand on, recently used ones and the node's own builds", async () => {
    const imagesDir = await mkdtemp("/tmp/cocoon-image-cache-");
    dirs.push(imagesDir);
    const released: string[] = [];
    const deleted = new Set(["img-deleted"]);
    const inUse = new Set<string>();
    const cache = new ImageCache({
      imagesDir,
      boundBytes: 5 * MiB,
      snapshotDirsInUse: () => inUse,
      exists: async (id) => !deleted.has(id),
      release: async (dir) => void released.push(dir),
    });
    const hourAgo = (minutes: number) => new Date(Date.now() - 60 * 60_000 + minutes * 60_000);
    const pulled = async (id: string, mib: number, usedAt: Date) => {
      await mkdir(cache.snapshotDir(id), { recursive: true });
      await writeFile(join(cache.snapshotDir(id), "disk.qcow2"), Buffer.alloc(mib * MiB, 1));
      await cache.markPulled(id);
      await utimes(join(imagesDir, id, "pulled"), usedAt, usedAt);
    };
    await pulled("img-oldest", 2, hourAgo(0));
    await pulled("img-old", 2, hourAgo(1));
    await pulled("img-newer", 2, hourAgo(2));
    await pulled("img-stood-on", 2, hourAgo(-10));
    await pulled("img-deleted", 1, hourAgo(3));
    // Built here: no marker, never the cache's.
    await mkdir(join(imagesDir, "img-built-here", "snapshot"), { recursive: true });
    await writeFile(join(imagesDir, "img-built-here", "snapshot", "disk.qcow2"), Buffer.alloc(4 * MiB, 1));
    inUse.add(cache.snapshotDir("img-stood-on"));
    // Used now (a launch may be starting from it): kept whatever its age said.
    await pulled("img-just-used", 1, hourAgo(-20));
    expect(await cache.touch("img-just-used")).toBe(true);
    expect(await cache.touch("img-built-here")).toBe(false);

    await cache.evict();
    // 2 (stood on) + 2 (newer) + 1 (just used) = 5 MiB: the two least recently used and the deleted one went.
    expect((await readdir(imagesDir)).sort()).toEqual(["img-built-here", "img-just-used", "img-newer", "img-stood-on"]);
    expect(released.sort()).toEqual(["img-deleted", "img-old", "img-oldest"].map((id) => cache.snapshotDir(id)));
  });
});
