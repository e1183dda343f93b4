import { copyFile, link } from "node:fs/promises";
import { join } from "node:path";
import type { Db } from "../store/db.ts";
import { serialized } from "../store/locks.ts";
import type { ClusterSnapshotsTable } from "../store/schema.ts";
import type { Snapshot } from "../vmm/engine.ts";
import type { ImageObjects } from "./image-objects.ts";

/** What a node published: its prefix, its manifest's sha256 and the bytes uploaded. */
type Published = { prefix: string; manifestSha256: string; bytes: number };

/**
 * The managed images' snapshots (`base` and its shapes, `python`, `node`)
 * and their root filesystems, built once per cluster (docs/cluster.md), both
 * recorded in `cluster_snapshots` by name and key: the node that first needs
 * one takes a PostgreSQL advisory lock on its name and key (the hash of all
 * it is made from, QEMU build included), builds it, publishes it to the
 * object store and records the published manifest's sha256, all under the
 * lock; a node that needs it meanwhile waits on the lock, then pulls it
 * (every file checked against that sha256). A pull that fails falls back to
 * building here.
 */
export class ClusterSnapshots {
  constructor(
    private readonly db: Db,
    private readonly objects: ImageObjects,
    private readonly opts: { nodeId: string; log?: (line: string) => void },
  ) {}

  /**
   * Fills `dir` with snapshot `name` of `key` (the asset cache's build
   * directory): pulled if a node of the cluster published it, else made by
   * `build` here and published.
   */
  build(target: { name: string; key: string; vcpus: number; memoryMiB: number; diskGiB: number }, dir: string, build: (dir: string) => Promise<Snapshot>): Promise<void> {
    const id = `managed-${target.name}-${target.key}`;
    return this.once(target, {
      pull: (row) => this.objects.pull({ id, vcpus: target.vcpus, memoryMiB: target.memoryMiB, diskGiB: target.diskGiB, object: row.object, manifest: row.manifest }, dir),
      build: () => build(dir),
      publish: (snapshot) => this.objects.publish(id, snapshot),
    });
  }

  /**
   * Fills `out` (the asset cache's build directory) with root filesystem
   * `name` of `key` as `disk.qcow2`: linked from the blob a node of the
   * cluster published (its mmdebstrap run is not repeated here), else made
   * by `build` here and published.
   */
  rootfs(target: { name: string; key: string; maxBytes: number }, out: string, build: (out: string) => Promise<void>): Promise<void> {
    const disk = join(out, "disk.qcow2");
    return this.once(target, {
      pull: async (row) => {
        const blob = await this.objects.pullRootfs({ ...target, object: row.object, manifest: row.manifest });
        // The blob cache may drop its name; the asset keeps a name of its own (a copy across filesystems).
        await link(blob, disk).catch(() => copyFile(blob, disk));
      },
      build: () => build(out),
      publish: () => this.objects.publishRootfs(target, disk),
    });
  }

  /** Pulls what `target` names if a node published it, else builds and publishes it: under the cluster-wide lock of its name and key. */
  private async once<Made>(
    target: { name: string; key: string },
    steps: { pull: (row: ClusterSnapshotsTable) => Promise<void>; build: () => Promise<Made>; publish: (made: Made) => Promise<Published> },
  ): Promise<void> {
    const log = this.opts.log;
    const what = `${target.name} (${target.key})`;
    await serialized(this.db, `cluster-snapshot:${target.name}:${target.key}`, async () => {
      const row = await this.db.selectFrom("cluster_snapshots").selectAll().where("name", "=", target.name).where("key", "=", target.key).executeTakeFirst();
      if (row) {
        const started = performance.now();
        const pulled = await steps.pull(row).then(
          () => true,
          (err: Error) => (log?.(`pulling ${what} made by node ${row.node_id}: ${err.message}; building it here`), false),
        );
        if (pulled) {
          log?.(`${what} pulled from the object store in ${((performance.now() - started) / 1000).toFixed(1)} s: node ${row.node_id} built it`);
          return;
        }
        await steps.build();
        return;
      }
      const made = await steps.build();
      const started = performance.now();
      const published = await steps.publish(made).catch((err: Error) => void log?.(`publishing ${what}: ${err.message}`));
      if (!published) return;
      await this.db
        .insertInto("cluster_snapshots")
        .values({ name: target.name, key: target.key, object: published.prefix, manifest: published.manifestSha256, node_id: this.opts.nodeId, created_at: new Date().toISOString() })
        .execute();
      log?.(`${what} published to the object store for the cluster (${(published.bytes / 2 ** 20).toFixed(1)} MiB in ${((performance.now() - started) / 1000).toFixed(1)} s)`);
    });
  }
}
