import { readdir, rm, stat, utimes, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ImageObjects } from "./image-objects.ts";

/** A pulled image in a node's cache, as eviction sees it. */
export interface CachedImage {
  id: string;
  bytes: number;
  lastUsedMs: number;
  /** A VM on this node (running or suspended) stands on it, or a launch may be starting from it: never evicted. */
  inUse: boolean;
}

/**
 * Least recently used first: the pulled images to evict so that the cache
 * holds at most `boundBytes`. Images in use are never evicted, even when
 * that leaves the cache over its bound.
 */
export function pickEvictions(images: readonly CachedImage[], boundBytes: number): string[] {
  let total = images.reduce((n, i) => n + i.bytes, 0);
  const victims: string[] = [];
  for (const image of images.filter((i) => !i.inUse).sort((a, b) => a.lastUsedMs - b.lastUsedMs)) {
    if (total <= boundBytes) break;
    victims.push(image.id);
    total -= image.bytes;
  }
  return victims;
}

/** A launch takes an image's snapshot, then starts from it: an image used this recently may be under a launch. */
const RECENT_USE_MS = 120_000;
/** The marker of a pulled image (`<images>/<id>/pulled`): its mtime is the image's last use on this node. */
const MARKER = "pulled";

/**
 * The images a node pulled from the object store (docs/cluster.md): each in
 * `<images>/<id>/snapshot` like one built here, marked as pulled. Bounded by
 * size (COCOON_IMAGE_CACHE_GIB): after each pull the least recently used
 * are removed, never one a VM of this node stands on (its overlay's chain
 * is the image's disk) nor one used in the last two minutes; an image
 * deleted in the cluster goes at the next pull. The images this node built
 * are not in the cache: the cluster's copy of record is theirs.
 */
export class ImageCache {
  constructor(
    private readonly opts: {
      imagesDir: string;
      boundBytes: number;
      /** The snapshot directories VMs of this node stand on (running and suspended). */
      snapshotDirsInUse: () => Set<string>;
      /** Whether the image still exists in the cluster. */
      exists: (imageId: string) => Promise<boolean>;
      /** Ends what the engine holds of a snapshot (its warm VMs) before its files go. */
      release: (snapshotDir: string) => Promise<void>;
      log?: (line: string) => void;
    },
  ) {}

  snapshotDir(imageId: string): string {
    return join(this.opts.imagesDir, imageId, "snapshot");
  }

  /** Marks `imageId` as pulled, used now (before its snapshot is in place: a crash leaves it evictable). */
  async markPulled(imageId: string): Promise<void> {
    await writeFile(join(this.opts.imagesDir, imageId, MARKER), "");
  }

  /** Whether `imageId` is a pulled one; if so, it is marked used now. */
  async touch(imageId: string): Promise<boolean> {
    const now = new Date();
    return utimes(join(this.opts.imagesDir, imageId, MARKER), now, now).then(
      () => true,
      () => false,
    );
  }

  /** Removes the pulled images past the bound (LRU) and those deleted in the cluster, unless in use. */
  async evict(): Promise<void> {
    const inUse = this.opts.snapshotDirsInUse();
    const now = Date.now();
    const images: CachedImage[] = [];
    const gone: string[] = [];
    for (const id of await readdir(this.opts.imagesDir).catch(() => [] as string[])) {
      const marker = await stat(join(this.opts.imagesDir, id, MARKER)).catch(() => undefined);
      if (!marker) continue;
      const used = inUse.has(this.snapshotDir(id)) || now - marker.mtimeMs < RECENT_USE_MS;
      if (!used && !(await this.opts.exists(id))) gone.push(id);
      else images.push({ id, bytes: await ImageObjects.sizeOf(this.snapshotDir(id)), lastUsedMs: marker.mtimeMs, inUse: used });
    }
    for (const id of [...gone, ...pickEvictions(images, this.opts.boundBytes)]) {
      await this.opts.release(this.snapshotDir(id));
      await rm(join(this.opts.imagesDir, id), { recursive: true, force: true });
      this.opts.log?.(`image cache: removed ${id}${gone.includes(id) ? " (deleted)" : " (least recently used)"}`);
    }
  }
}
