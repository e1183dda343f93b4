import { sql } from "kysely";
import { ApiError } from "../errors.ts";
import type { Db } from "./db.ts";
import { trySerialized } from "./locks.ts";
import { blobKey, MANIFEST, type ObjectStore } from "./objects.ts";

export interface BucketSweepOptions {
  /** An unreferenced object younger than this (by the store's LastModified, against the database's now()) may be a publish in flight: kept. */
  graceSeconds: number;
  /** Objects one pass looks at, at most (a huge bucket is swept over several passes). */
  maxKeysPerPass: number;
  log?: (line: string) => void;
}

export interface SweepResult {
  bundlesDeleted: number;
  blobsDeleted: number;
  uploadsAborted: number;
  /** The pass listed every bundle and blob from the start (else it stopped at its cap: the next goes on from there). */
  complete: boolean;
}

/** The bundles' prefixes: `<kind>/<id>/<16 hex>/<file>` (SuspendedObjects, ImageObjects). Any other key there is not Cocoon's: never touched. */
const BUNDLE_KEY = /^((?:microvms|images)\/[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\/[0-9a-f]{16})\/([A-Za-z0-9][A-Za-z0-9._-]{0,63})$/;
const BLOB_KEY = /^blobs\/([0-9a-f]{64})$/;
const BUNDLE_ROOTS = ["images/", "microvms/"];
/** Default grace: far longer than a publish takes (its blobs refreshed within BLOB_REFRESH_MS of its start) plus any clock skew between the store and the database. */
export const SWEEP_GRACE_SECONDS = 3600;
/** Objects one pass looks at, at most, by default: a page of 1,000 keys is ~100 KiB; 50 pages bound a pass's memory and time. */
export const SWEEP_MAX_KEYS = 50_000;
/** Deletions in flight at once. */
const DELETES_AT_ONCE = 16;

/**
 * Collects what the database no longer references from the cluster's
 * bucket (docs/cluster.md): published suspends and images whose deletion
 * failed, publishes cut short (files without a manifest, multipart uploads
 * never completed), bundles of rows gone, and blobs no bundle stands on.
 * One node of the cluster sweeps at a time (an advisory lock; the others
 * skip), every interval and once at start.
 *
 * Mark: the prefixes the database references (a suspended VM's, a VM's
 * restore point, an image's, a managed image's snapshot's or root
 * filesystem's), read first, and the layers their manifests
 * name (and, listing the bucket, the layers of bundles younger than the
 * grace period). Sweep: every other bundle and blob older than the grace
 * period (the store's LastModified against the database's now()).
 *
 * Why the grace period makes this safe without a lock on the publishers: a
 * publish writes its files, then its manifest, then the row that references
 * it. The database is read before the bucket is listed, so a bundle
 * published and referenced after the mark has objects written after the
 * mark: they are young when listed, and kept. The blobs a publish reuses
 * were written (or refreshed, `ObjectStore.putBlob`) within BLOB_REFRESH_MS
 * before its start, so they stay young until its row references it, and
 * from then on the mark holds them. This holds while a publish takes less
 * than the grace period less BLOB_REFRESH_MS, and the clocks of the store,
 * the database and the node agree within the rest: the hour by default
 * leaves tens of minutes of margin for a publish of minutes.
 */
export class BucketSweep {
  /** Where the next pass goes on from (bundles, blobs), when the last one stopped at its cap. */
  private resumeAfter: string | undefined;
  private blobsResumeAfter: string | undefined;
  /** The layers of manifests already read, by the sha256 the database pins them by (a pinned manifest never changes). */
  private readonly layersByManifest = new Map<string, string[]>();
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  /** Set by stop(): a pass under way ends at its next page (a server stopping does not wait for a backlog). */
  private stopped = false;

  constructor(
    private readonly db: Db,
    private readonly store: ObjectStore,
    private readonly opts: BucketSweepOptions,
  ) {}

  /** Sweeps now and then every `everyMs`, when no other node of the cluster does. Errors are logged; the next pass tries again. */
  start(everyMs: number): void {
    const tick = () => {
      if (this.running) return;
      this.running = trySerialized(this.db, "bucket-sweep", async () => {
        const r = await this.pass();
        if (r.bundlesDeleted + r.blobsDeleted + r.uploadsAborted > 0) {
          this.opts.log?.(`bucket sweep: removed ${r.bundlesDeleted} unreferenced bundle(s), ${r.blobsDeleted} blob(s), ${r.uploadsAborted} unfinished upload(s)`);
        }
      })
        .then(() => undefined)
        .catch((err: Error) => this.opts.log?.(`bucket sweep failed (tried again in ${Math.round(everyMs / 1000)} s): ${err.message}`))
        .finally(() => (this.running = undefined));
    };
    tick();
    this.timer = setInterval(tick, everyMs);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    this.timer = undefined;
    await this.running;
  }

  /** One pass (the caller holds the lock, or is a test). */
  async pass(): Promise<SweepResult> {
    const result: SweepResult = { bundlesDeleted: 0, blobsDeleted: 0, uploadsAborted: 0, complete: false };
    // The database first (see the class comment), and its clock: the one every node agrees on.
    const now = await databaseNow(this.db);
    const cutoff = now.getTime() - this.opts.graceSeconds * 1000;
    const referenced = await this.referenced();
    const liveLayers = new Set<string>();
    let marked = true;
    for (const [prefix, sha256] of referenced) {
      const layers = await this.layers(prefix, sha256).catch((err: Error) => this.unreadable(prefix, err, () => (marked = false)));
      for (const l of layers) liveLayers.add(l);
    }
    const pinned = new Set(referenced.values());
    for (const sha256 of this.layersByManifest.keys()) if (!pinned.has(sha256)) this.layersByManifest.delete(sha256);

    // Bundles: grouped by prefix (a bundle's keys are adjacent in key order).
    const startedAfter = this.resumeAfter;
    let seen = 0;
    let capped = false;
    const sweepBundle = async (prefix: string, objects: { key: string; lastModified: Date }[]) => {
      if (referenced.has(prefix)) return;
      if (objects.some((o) => o.lastModified.getTime() > cutoff)) {
        // Possibly in flight: its manifest's layers are kept too.
        if (objects.some((o) => o.key === `${prefix}/${MANIFEST}`)) {
          const layers = await this.store.layersOf(prefix).catch((err: Error) => this.unreadable(prefix, err, () => (marked = false)));
          for (const l of layers ?? []) liveLayers.add(l);
        }
        return;
      }
      // Unpublished first (its manifest), then its files.
      doomed.push(objects.map((o) => o.key).sort((a, b) => Number(b.endsWith(`/${MANIFEST}`)) - Number(a.endsWith(`/${MANIFEST}`))));
      result.bundlesDeleted++;
    };
    // Deleted a page at a time, several bundles at once (one DELETE is a round trip).
    const doomed: string[][] = [];
    const deleteDoomed = () =>
      eachLimited(doomed.splice(0), DELETES_AT_ONCE, async (keys) => {
        for (const key of keys) await this.store.delete(key);
      });
    outer: for (const root of BUNDLE_ROOTS) {
      if (startedAfter !== undefined && startedAfter >= root && !startedAfter.startsWith(root)) continue;
      let group: { prefix: string; objects: { key: string; lastModified: Date }[]; lastKey: string } | undefined;
      for await (const page of this.store.list(root, startedAfter?.startsWith(root) ? startedAfter : undefined)) {
        if (this.stopped) {
          capped = true;
          break outer;
        }
        for (const o of page) {
          // Every key counts, Cocoon's or not: a bucket full of others' keys cannot make a pass unbounded.
          if (++seen > this.opts.maxKeysPerPass) {
            capped = true;
            // One "bundle" of more keys than a pass looks at (others' keys under its prefix): passed over, so later ones are swept.
            if (group && this.resumeAfter === startedAfter) this.resumeAfter = group.lastKey;
            break outer;
          }
          // A key past the open bundle closes it; the next pass goes on after it.
          if (group && !o.key.startsWith(`${group.prefix}/`)) {
            await sweepBundle(group.prefix, group.objects);
            this.resumeAfter = group.lastKey;
            group = undefined;
          }
          const m = BUNDLE_KEY.exec(o.key);
          if (!m) {
            // Not Cocoon's (inside a bundle's prefix or not): left alone.
            if (group) group.lastKey = o.key;
            else this.resumeAfter = o.key;
            continue;
          }
          group ??= { prefix: m[1]!, objects: [], lastKey: o.key };
          group.objects.push(o);
          group.lastKey = o.key;
        }
        await deleteDoomed();
      }
      if (group) await sweepBundle(group.prefix, group.objects);
    }
    await deleteDoomed();
    if (!capped) this.resumeAfter = undefined;

    // Blobs: only with the whole mark (every referenced manifest read); the young ones are safe without it (see the class comment).
    let blobsCapped = true;
    const blobsAfter = this.blobsResumeAfter;
    if (marked && !this.stopped) {
      let blobsSeen = 0;
      this.blobsResumeAfter = undefined;
      for await (const page of this.store.list("blobs/", blobsAfter)) {
        const unreferenced: string[] = [];
        for (const o of page) {
          if (++blobsSeen > this.opts.maxKeysPerPass) break;
          this.blobsResumeAfter = o.key;
          const m = BLOB_KEY.exec(o.key);
          if (!m || liveLayers.has(m[1]!) || o.lastModified.getTime() > cutoff) continue;
          unreferenced.push(blobKey(m[1]!));
        }
        await eachLimited(unreferenced, DELETES_AT_ONCE, (key) => this.store.delete(key));
        result.blobsDeleted += unreferenced.length;
        if (blobsSeen > this.opts.maxKeysPerPass || this.stopped) break;
      }
      blobsCapped = blobsSeen > this.opts.maxKeysPerPass;
      if (!blobsCapped) this.blobsResumeAfter = undefined;
    }
    result.complete = !capped && startedAfter === undefined && !blobsCapped && blobsAfter === undefined;
    // Multipart uploads a dead node never completed nor aborted.
    if (!this.stopped) for (const root of [...BUNDLE_ROOTS, "blobs/"]) result.uploadsAborted += await this.store.abortUploads(root, new Date(cutoff));
    return result;
  }

  /**
   * A manifest that could not be read: one the store refuses to give (down,
   * failing) leaves the mark incomplete (`incomplete`: no blob is swept this
   * pass); one that is not what Cocoon published (BadGateway: tampered, not
   * ours) stands on nothing a resume or pull could use.
   */
  private unreadable(prefix: string, err: Error, incomplete: () => void): string[] {
    if (!(err instanceof ApiError && err.code === "BadGateway")) incomplete();
    this.opts.log?.(`bucket sweep: reading ${prefix}/${MANIFEST}: ${err.message}`);
    return [];
  }

  /** Every prefix the database references, with its manifest's sha256. */
  private async referenced(): Promise<Map<string, string | null>> {
    const refs = new Map<string, string | null>();
    const vms = await this.db.selectFrom("microvms").select(["suspended_object as object", "suspended_manifest as manifest"]).where("suspended_object", "is not", null).execute();
    // A VM that opted in to restore keeps its last published suspend while it runs (its restore point).
    const restorePoints = await this.db.selectFrom("microvms").select(["restore_object as object", "restore_manifest as manifest"]).where("restore_object", "is not", null).execute();
    const images = await this.db.selectFrom("images").select(["snapshot_object as object", "snapshot_manifest as manifest"]).where("snapshot_object", "is not", null).execute();
    const managed = await this.db.selectFrom("cluster_snapshots").select(["object", "manifest"]).execute();
    for (const r of [...vms, ...restorePoints, ...images, ...managed]) if (r.object) refs.set(r.object, r.manifest);
    return refs;
  }

  /** The layers the bundle at `prefix` stands on (none when it has no manifest), read once per pinned manifest. */
  private async layers(prefix: string, sha256: string | null): Promise<string[]> {
    const cached = sha256 ? this.layersByManifest.get(sha256) : undefined;
    if (cached) return cached;
    const layers = (await this.store.layersOf(prefix, sha256 ?? undefined)) ?? [];
    if (sha256) this.layersByManifest.set(sha256, layers);
    return layers;
  }
}

/** Runs `work` on each of `items`, at most `limit` at once. */
async function eachLimited<T>(items: T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) await work(items[next++]!);
    }),
  );
}

/** The database's clock (PostgreSQL's now(); SQLite's CURRENT_TIMESTAMP, UTC). */
async function databaseNow(db: Db): Promise<Date> {
  const { rows } = await sql<{ now: Date | string }>`select CURRENT_TIMESTAMP as now`.execute(db);
  const raw = rows[0]!.now;
  return raw instanceof Date ? raw : new Date(`${raw.replace(" ", "T")}Z`);
}
