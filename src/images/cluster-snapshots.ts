import type { Db } from "../store/db.ts";
import { serialized } from "../store/locks.ts";
import type { Snapshot } from "../vmm/engine.ts";
import type { ImageObjects } from "./image-objects.ts";

/**
 * The managed images' snapshots (`base` and its shapes, `python`, `node`),
 * built once per cluster (docs/cluster.md): the node that first needs one
 * takes a PostgreSQL advisory lock on its name and key (the hash of all it
 * is made from, QEMU build included), builds it, publishes it to the object
 * store and records the published manifest's sha256 in `cluster_snapshots`,
 * all under the lock; a node that needs it meanwhile waits on the lock, then
 * pulls it (every file checked against that sha256). A pull that fails
 * falls back to building here.
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
  async build(target: { name: string; key: string; vcpus: number; memoryMiB: number; diskGiB: number }, dir: string, build: (dir: string) => Promise<Snapshot>): Promise<void> {
    const log = this.opts.log;
    await serialized(this.db, `cluster-snapshot:${target.name}:${target.key}`, async () => {
      const id = `managed-${target.name}-${target.key}`;
      const row = await this.db.selectFrom("cluster_snapshots").selectAll().where("name", "=", target.name).where("key", "=", target.key).executeTakeFirst();
      if (row) {
        const started = performance.now();
        const pulled = await this.objects.pull({ id, vcpus: target.vcpus, memoryMiB: target.memoryMiB, diskGiB: target.diskGiB, object: row.object, manifest: row.manifest }, dir).then(
          () => true,
          (err: Error) => (log?.(`pulling ${target.name} (${target.key}) made by node ${row.node_id}: ${err.message}; building it here`), false),
        );
        if (pulled) {
          log?.(`${target.name} (${target.key}) pulled from the object store in ${((performance.now() - started) / 1000).toFixed(1)} s: node ${row.node_id} built it`);
          return;
        }
        await build(dir);
        return;
      }
      const snapshot = await build(dir);
      const started = performance.now();
      const published = await this.objects.publish(id, snapshot).catch((err: Error) => void log?.(`publishing ${target.name} (${target.key}): ${err.message}`));
      if (!published) return;
      await this.db
        .insertInto("cluster_snapshots")
        .values({ name: target.name, key: target.key, object: published.prefix, manifest: published.manifestSha256, node_id: this.opts.nodeId, created_at: new Date().toISOString() })
        .execute();
      log?.(`${target.name} (${target.key}) published to the object store for the cluster (${(published.bytes / 2 ** 20).toFixed(1)} MiB in ${((performance.now() - started) / 1000).toFixed(1)} s)`);
    });
  }
}
