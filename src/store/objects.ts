import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CopyObjectCommand,
  CreateBucketCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  S3ServiceException,
  UploadPartCommand,
} from "@aws-sdk/client-s3";
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import { chmod, mkdir, rename, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { ApiError } from "../errors.ts";
import { fsyncDir } from "../util/files.ts";

/** Where a cluster keeps what moves between its nodes (docs/cluster.md): an S3-compatible bucket. */
export interface ObjectStoreConfig {
  /** The S3 endpoint, `http(s)://host:port` (COCOON_OBJECT_STORE_URL); path-style addressing. */
  url: string;
  /** COCOON_OBJECT_STORE_BUCKET (default `cocoon`); made at start if missing. */
  bucket: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
}

/** A file of a published bundle as its manifest names it. */
export interface ObjectFile {
  sha256: string;
  bytes: number;
}

/** A bundle's manifest: written last, so a bundle without one was never published. */
export interface BundleManifest<Meta> {
  format: typeof BUNDLE_FORMAT;
  files: Record<string, ObjectFile>;
  meta: Meta;
}

/** A manifest as published: `sha256` of its bytes is what a reader that trusts the publisher (its database row) pins it by. */
export type PublishedManifest<Meta> = BundleManifest<Meta> & { sha256: string };

export const BUNDLE_FORMAT = 1;

/** Files up to this size go up in one PUT; bigger ones in parts of this size (S3 allows 10,000 parts). */
export const PART_BYTES = 64 * 2 ** 20;
/** A manifest read from the store is untrusted: past this it is refused unread. */
const MANIFEST_MAX_BYTES = 64 * 2 ** 10;
export const MANIFEST = "manifest.json";
/** Layers under a published disk (its backing chain), at most. */
const MAX_LAYERS = 16;
/**
 * A blob a publish finds in the bucket but last written longer ago than
 * this is written again (a copy onto itself) before the publish relies on
 * it: the bucket's sweep (BucketSweep) collects only blobs older than its
 * grace period, so a publish in progress never loses a layer it reused.
 */
export const BLOB_REFRESH_MS = 10 * 60_000;

/**
 * An S3-compatible object store (OpenStack Swift's s3api, MinIO, AWS S3)
 * through the real AWS SDK client. Files go up streamed (multipart past
 * PART_BYTES) with their sha256 computed on the way, and come down streamed,
 * hashed, bounded by the size the caller expects, and renamed into place only
 * once the checksum matches. Bundles (`publish`/`fetchBundle`) are files
 * under a prefix with a manifest written last.
 *
 * What the store returns is untrusted: manifests are bounded and checked,
 * only the names the caller asks for are read from them, and no path ever
 * comes from the store.
 */
export class ObjectStore {
  private readonly client: S3Client;
  readonly bucket: string;
  /** sha256 of read-only files published as blobs, by path, size and mtime. */
  private readonly blobHashes = new Map<string, ObjectFile>();

  constructor(config: ObjectStoreConfig) {
    this.bucket = config.bucket;
    this.client = new S3Client({
      endpoint: config.url,
      region: config.region,
      forcePathStyle: true,
      credentials: { accessKeyId: config.accessKeyId, secretAccessKey: config.secretAccessKey },
      // Swift's s3api (and other S3-compatible stores) reject the SDK's default flexible checksums.
      requestChecksumCalculation: "WHEN_REQUIRED",
      responseChecksumValidation: "WHEN_REQUIRED",
    });
  }

  /** Makes the bucket if it does not exist (every node may call it at start). */
  async ensureBucket(): Promise<void> {
    const exists = await this.client.send(new HeadBucketCommand({ Bucket: this.bucket })).then(() => true, (err: unknown) => (isNotFound(err) ? false : Promise.reject(err)));
    if (exists) return;
    await this.client.send(new CreateBucketCommand({ Bucket: this.bucket })).catch((err: unknown) => {
      // Another node made it first.
      if (err instanceof S3ServiceException && (err.name === "BucketAlreadyOwnedByYou" || err.name === "BucketAlreadyExists")) return;
      throw err;
    });
  }

  /** Uploads file `path` as `key`, streamed (in parts past PART_BYTES); returns its size and sha256 as read. */
  async putFile(key: string, path: string): Promise<ObjectFile> {
    const { size } = await stat(path);
    const hash = createHash("sha256");
    if (size <= PART_BYTES) {
      await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: hashed(createReadStream(path), hash), ContentLength: size }));
      return { sha256: hash.digest("hex"), bytes: size };
    }
    const { UploadId } = await this.client.send(new CreateMultipartUploadCommand({ Bucket: this.bucket, Key: key }));
    try {
      const parts: { ETag: string | undefined; PartNumber: number }[] = [];
      // In order, one at a time: the hash covers the file in order, and a suspend's upload should not starve the node's VMs of IO.
      for (let start = 0, part = 1; start < size; start += PART_BYTES, part++) {
        const bytes = Math.min(PART_BYTES, size - start);
        const body = hashed(createReadStream(path, { start, end: start + bytes - 1 }), hash);
        const res = await this.client.send(new UploadPartCommand({ Bucket: this.bucket, Key: key, UploadId, PartNumber: part, Body: body, ContentLength: bytes }));
        parts.push({ ETag: res.ETag, PartNumber: part });
      }
      await this.client.send(new CompleteMultipartUploadCommand({ Bucket: this.bucket, Key: key, UploadId, MultipartUpload: { Parts: parts } }));
    } catch (err) {
      await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: key, UploadId })).catch(() => undefined);
      throw err;
    }
    return { sha256: hash.digest("hex"), bytes: size };
  }

  /**
   * Downloads `key` into `path` (mode 0600), streamed: refused past
   * `expect.bytes`, and kept only when its size and sha256 are `expect`'s
   * (BadGateway otherwise; nothing is left at `path`).
   */
  async getFile(key: string, path: string, expect: ObjectFile): Promise<void> {
    const partial = join(dirname(path), `.${randomBytes(6).toString("hex")}.partial`);
    try {
      const res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: key }));
      const hash = createHash("sha256");
      let bytes = 0;
      const meter = new Transform({
        transform(chunk: Buffer, _enc, done) {
          bytes += chunk.length;
          if (bytes > expect.bytes) return done(corrupt(key, `is larger than the ${expect.bytes} bytes its manifest gives`));
          hash.update(chunk);
          done(null, chunk);
        },
      });
      await pipeline(res.Body as Readable, meter, createWriteStream(partial, { mode: 0o600 }));
      if (bytes !== expect.bytes) throw corrupt(key, `has ${bytes} bytes, its manifest gives ${expect.bytes}`);
      const sha256 = hash.digest("hex");
      if (sha256 !== expect.sha256) throw corrupt(key, `has sha256 ${sha256}, its manifest gives ${expect.sha256}`);
      await rename(partial, path);
      await fsyncDir(dirname(path));
    } finally {
      await rm(partial, { force: true });
    }
  }

  /** The object's size, or undefined when there is none. */
  async head(key: string): Promise<{ bytes: number; lastModified?: Date } | undefined> {
    return this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key })).then(
      (res) => ({ bytes: res.ContentLength ?? 0, lastModified: res.LastModified }),
      (err: unknown) => (isNotFound(err) ? undefined : Promise.reject(err)),
    );
  }

  async delete(key: string): Promise<void> {
    await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key }));
  }

  /**
   * The objects under `prefix` in key order, after `startAfter`, a page
   * (at most 1,000) at a time: what the bucket's sweep walks.
   */
  async *list(prefix: string, startAfter?: string): AsyncGenerator<{ key: string; lastModified: Date; bytes: number }[]> {
    let token: string | undefined;
    do {
      const page = await this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: prefix, StartAfter: token ? undefined : startAfter, ContinuationToken: token }));
      yield (page.Contents ?? []).filter((o) => o.Key !== undefined && o.LastModified !== undefined).map((o) => ({ key: o.Key!, lastModified: o.LastModified!, bytes: o.Size ?? 0 }));
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  /** Aborts the multipart uploads under `prefix` begun before `before` (a publish cut short), at most 1,000; returns how many. */
  async abortUploads(prefix: string, before: Date): Promise<number> {
    const page = await this.client.send(new ListMultipartUploadsCommand({ Bucket: this.bucket, Prefix: prefix }));
    let aborted = 0;
    for (const u of page.Uploads ?? []) {
      if (!u.Key || !u.UploadId || !u.Initiated || u.Initiated >= before) continue;
      await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: u.Key, UploadId: u.UploadId }));
      aborted++;
    }
    return aborted;
  }

  /**
   * The sha256 of the layers the bundle at `prefix` stands on (its
   * manifest's meta), undefined when it has no manifest; BadGateway when
   * the manifest is not one `publishLayered` wrote (or not the one whose
   * sha256 is `sha256`, when given).
   */
  async layersOf(prefix: string, sha256?: string): Promise<string[] | undefined> {
    const manifest = await this.manifest(prefix, {}, sha256);
    if (!manifest) return undefined;
    return listedLayers(prefix, manifest.meta, Number.MAX_SAFE_INTEGER).map((l) => l.sha256);
  }

  /** Deletes every object under `prefix` (a bundle), its manifest first so it is unpublished before its files go. */
  async deletePrefix(prefix: string): Promise<void> {
    await this.delete(`${prefix}/${MANIFEST}`);
    for await (const page of this.list(`${prefix}/`)) for (const o of page) await this.delete(o.key);
  }

  /**
   * Publishes files under `prefix` (`<prefix>/<name>` each), then the
   * manifest with their sizes and sha256 and `meta`: a reader that finds
   * the manifest finds every file complete. Returns it with its own sha256.
   */
  async publish<Meta>(prefix: string, files: Record<string, string>, meta: Meta): Promise<PublishedManifest<Meta>> {
    const manifest: BundleManifest<Meta> = { format: BUNDLE_FORMAT, files: {}, meta };
    for (const [name, path] of Object.entries(files)) manifest.files[name] = await this.putFile(`${prefix}/${name}`, path);
    const body = Buffer.from(JSON.stringify(manifest));
    await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: `${prefix}/${MANIFEST}`, Body: body, ContentLength: body.length, ContentType: "application/json" }));
    return { ...manifest, sha256: createHash("sha256").update(body).digest("hex") };
  }

  /**
   * The manifest of the bundle at `prefix`, checked: undefined when none was
   * published; BadGateway when it is too large, not JSON, of another
   * format, or lacks one of `names` or gives one a size past its limit.
   * Only `names` are kept of its files. With `sha256` (what the publisher
   * recorded where the store cannot write), a manifest of other bytes is
   * refused before it is parsed: the whole bundle is then the publisher's.
   */
  async manifest(prefix: string, limits: Record<string, number>, sha256?: string, optional: readonly string[] = []): Promise<BundleManifest<unknown> | undefined> {
    const key = `${prefix}/${MANIFEST}`;
    const res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: key })).catch((err: unknown) => (isNotFound(err) ? undefined : Promise.reject(err)));
    if (!res) return undefined;
    if ((res.ContentLength ?? 0) > MANIFEST_MAX_BYTES) {
      (res.Body as Readable).destroy();
      throw corrupt(key, `is larger than ${MANIFEST_MAX_BYTES} bytes`);
    }
    const chunks: Buffer[] = [];
    let bytes = 0;
    for await (const chunk of res.Body as Readable) {
      bytes += (chunk as Buffer).length;
      if (bytes > MANIFEST_MAX_BYTES) {
        (res.Body as Readable).destroy();
        throw corrupt(key, `is larger than ${MANIFEST_MAX_BYTES} bytes`);
      }
      chunks.push(chunk as Buffer);
    }
    const raw = Buffer.concat(chunks);
    if (sha256 !== undefined && createHash("sha256").update(raw).digest("hex") !== sha256) throw corrupt(key, `is not the manifest that was published (its sha256 is not ${sha256})`);
    let parsed: unknown;
    try {
      parsed = JSON.parse(raw.toString("utf8"));
    } catch {
      throw corrupt(key, "is not JSON");
    }
    const m = parsed as Partial<BundleManifest<unknown>> | null;
    if (!m || typeof m !== "object" || m.format !== BUNDLE_FORMAT || !m.files || typeof m.files !== "object") throw corrupt(key, `is not a format ${BUNDLE_FORMAT} bundle manifest`);
    const files: Record<string, ObjectFile> = {};
    for (const [name, max] of Object.entries(limits)) {
      const f = Object.hasOwn(m.files, name) ? (m.files as Record<string, unknown>)[name] as Partial<ObjectFile> : undefined;
      if (!f && optional.includes(name)) continue;
      if (!f || typeof f.sha256 !== "string" || !/^[0-9a-f]{64}$/.test(f.sha256) || !Number.isSafeInteger(f.bytes) || f.bytes! < 0) throw corrupt(key, `gives no valid size and sha256 for ${name}`);
      if (f.bytes! > max) throw corrupt(key, `gives ${name} ${f.bytes} bytes, more than its limit of ${max}`);
      files[name] = { sha256: f.sha256, bytes: f.bytes! };
    }
    return { format: BUNDLE_FORMAT, files, meta: m.meta };
  }

  /**
   * Downloads the files `names` of the bundle at `prefix` into `dir` (each
   * named as the caller names it), each checked against the manifest;
   * undefined when the bundle was never published (no manifest). `sha256`
   * and `optional` (names a bundle may lack): as for `manifest`; `check`
   * sees the manifest's meta before any file comes down (a bundle the
   * caller cannot take costs one small read) and throws to refuse it.
   */
  async fetchBundle(
    prefix: string,
    dir: string,
    limits: Record<string, number>,
    opts: { sha256?: string; optional?: readonly string[]; check?: (meta: unknown) => void } = {},
  ): Promise<BundleManifest<unknown> | undefined> {
    const manifest = await this.manifest(prefix, limits, opts.sha256, opts.optional);
    if (!manifest) return undefined;
    opts.check?.(manifest.meta);
    for (const [name, file] of Object.entries(manifest.files)) await this.getFile(`${prefix}/${name}`, join(dir, name), file);
    return manifest;
  }

  /**
   * Publishes a disk-and-state bundle (a suspended VM, an image's snapshot):
   * the read-only layers under its disk (`backing`, nearest first) as shared
   * blobs, then its `files`, then the manifest, whose meta is `meta` with
   * the layers. One format for everything that moves between nodes.
   */
  async publishLayered<Meta extends object>(prefix: string, files: Record<string, string>, backing: string[], meta: Meta): Promise<PublishedManifest<Meta & { layers: ObjectFile[] }>> {
    const layers: ObjectFile[] = [];
    for (const path of backing) layers.push(await this.putBlob(path));
    return this.publish(prefix, files, { ...meta, layers });
  }

  /**
   * Fetches a bundle `publishLayered` wrote, pinned by its manifest's
   * `sha256`: `check` of its meta (which refuses what the caller cannot
   * take), then its files into `dir` (each checked), then its layers into
   * `blobsDir` (each checked); returns the checked meta and the layers'
   * local paths, nearest first. BadGateway when there is no such bundle or
   * it gives more than MAX_LAYERS layers, a layer past `layerMaxBytes`.
   */
  async fetchLayered<Meta>(
    prefix: string,
    dir: string,
    opts: { limits: Record<string, number>; optional?: readonly string[]; sha256: string; blobsDir: string; layerMaxBytes: number; check: (meta: Record<string, unknown>) => Meta },
  ): Promise<{ meta: Meta; files: Record<string, ObjectFile>; layers: string[] }> {
    let meta: Meta | undefined;
    const check = (raw: unknown) => {
      if (!raw || typeof raw !== "object") throw corrupt(`${prefix}/${MANIFEST}`, "has no meta");
      meta = opts.check(raw as Record<string, unknown>);
    };
    const manifest = await this.fetchBundle(prefix, dir, opts.limits, { sha256: opts.sha256, optional: opts.optional, check });
    if (!manifest || meta === undefined) throw new ApiError("BadGateway", `the object store has no manifest under ${prefix}: refused`, { key: prefix });
    const layers: string[] = [];
    for (const l of listedLayers(prefix, manifest.meta, opts.layerMaxBytes)) layers.push(await this.getBlob(l, opts.blobsDir));
    return { meta, files: manifest.files, layers };
  }

  /**
   * Publishes a read-only file (a disk layer) content-addressed, as
   * `blobs/<sha256>`, unless it is there already: a layer many suspended VMs
   * share (an image's disk) goes up once. Its hash is computed once per
   * file (path, size, mtime) for the life of the process.
   */
  async putBlob(path: string): Promise<ObjectFile> {
    const { size, mtimeMs } = await stat(path);
    const id = `${path}\0${size}\0${mtimeMs}`;
    let file = this.blobHashes.get(id);
    if (!file) {
      const hash = createHash("sha256");
      for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
      file = { sha256: hash.digest("hex"), bytes: size };
      this.blobHashes.set(id, file);
    }
    const key = blobKey(file.sha256);
    const there = await this.head(key);
    if (there?.bytes !== file.bytes) {
      const put = await this.putFile(key, path);
      if (put.sha256 !== file.sha256) throw new Error(`${path} changed while it was published: it must be read-only`);
    } else if (!there.lastModified || Date.now() - there.lastModified.getTime() > BLOB_REFRESH_MS) {
      // Written long ago: made young again (server-side) so the sweep's grace period covers this publish.
      await this.client.send(new CopyObjectCommand({ Bucket: this.bucket, Key: key, CopySource: `${this.bucket}/${key}`, MetadataDirective: "REPLACE" }));
    }
    return file;
  }

  /**
   * The local copy of blob `file` in `cacheDir` (`<sha256>`, root's, 0444),
   * downloaded and verified unless it is there already; what is in the
   * cache was verified when it came in.
   */
  async getBlob(file: ObjectFile, cacheDir: string): Promise<string> {
    if (!/^[0-9a-f]{64}$/.test(file.sha256)) throw corrupt(blobKey(file.sha256), "has no valid sha256");
    const path = join(cacheDir, file.sha256);
    const have = await stat(path).catch(() => undefined);
    if (have?.size === file.bytes) return path;
    await mkdir(cacheDir, { recursive: true, mode: 0o700 });
    await this.getFile(blobKey(file.sha256), path, file);
    await chmod(path, 0o444);
    return path;
  }

  destroy(): void {
    this.client.destroy();
  }
}

/** COCOON_OBJECT_STORE_*: the cluster's object store (docs/cluster.md); undefined without a URL (nothing leaves the node's disk). */
export function objectStoreConfigFromEnv(env: NodeJS.ProcessEnv = process.env): ObjectStoreConfig | undefined {
  const url = env.COCOON_OBJECT_STORE_URL;
  if (url === undefined || url === "") return undefined;
  if (!/^https?:\/\/[^/]+\/?$/.test(url)) throw new Error(`COCOON_OBJECT_STORE_URL must be http(s)://host[:port], got "${url}"`);
  const bucket = env.COCOON_OBJECT_STORE_BUCKET || "cocoon";
  // S3's bucket naming rules: what every compatible store accepts.
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) throw new Error(`COCOON_OBJECT_STORE_BUCKET must be 3 to 63 lowercase letters, digits, dots and dashes, got "${bucket}"`);
  const accessKeyId = env.COCOON_OBJECT_STORE_ACCESS_KEY_ID;
  const secretAccessKey = env.COCOON_OBJECT_STORE_SECRET_ACCESS_KEY;
  if (!accessKeyId || !secretAccessKey) throw new Error("COCOON_OBJECT_STORE_URL needs COCOON_OBJECT_STORE_ACCESS_KEY_ID and COCOON_OBJECT_STORE_SECRET_ACCESS_KEY");
  return { url, bucket, region: env.COCOON_OBJECT_STORE_REGION || "us-east-1", accessKeyId, secretAccessKey };
}

/** Counts the bytes of a stream into `hash` as they pass. */
function hashed(source: Readable, hash: ReturnType<typeof createHash>): Readable {
  return source.pipe(
    new Transform({
      transform(chunk: Buffer, _enc, done) {
        hash.update(chunk);
        done(null, chunk);
      },
    }),
  );
}

export const blobKey = (sha256: string) => `blobs/${sha256}`;

/** The layers a `publishLayered` manifest's meta lists (untrusted), each checked; BadGateway for a list past MAX_LAYERS or a layer past `layerMaxBytes`. */
function listedLayers(prefix: string, meta: unknown, layerMaxBytes: number): ObjectFile[] {
  const listed = (meta as { layers?: unknown } | null)?.layers;
  if (!Array.isArray(listed) || listed.length > MAX_LAYERS) throw corrupt(`${prefix}/${MANIFEST}`, `gives no list of layers, or more than ${MAX_LAYERS} layers`);
  return listed.map((l: Partial<ObjectFile> | null) => {
    if (!l || typeof l.sha256 !== "string" || !/^[0-9a-f]{64}$/.test(l.sha256) || !Number.isSafeInteger(l.bytes) || l.bytes! < 0 || l.bytes! > layerMaxBytes) {
      throw corrupt(`${prefix}/${MANIFEST}`, "gives an invalid layer");
    }
    return { sha256: l.sha256, bytes: l.bytes! };
  });
}

function isNotFound(err: unknown): boolean {
  return err instanceof S3ServiceException && (err.$metadata.httpStatusCode === 404 || err.name === "NotFound" || err.name === "NoSuchKey" || err.name === "NoSuchBucket");
}

function corrupt(key: string, what: string): ApiError {
  return new ApiError("BadGateway", `object ${key} in the object store ${what}: refused`, { key });
}
