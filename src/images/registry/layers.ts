import { createReadStream } from "node:fs";
import { posix } from "node:path";
import { Writable } from "node:stream";
import { createGunzip } from "node:zlib";
import tar from "tar-stream";

/** Limits on a registry image, checked from its manifest and then from every layer's tar before anything is unpacked. */
export interface PullLimits {
  maxLayers: number;
  /** Sum of the layers as downloaded (compressed). */
  maxCompressedBytes: number;
  /** Sum of the file sizes in all layers. */
  maxUncompressedBytes: number;
  /** Tar entries in all layers. */
  maxEntries: number;
  /** Uncompressed ÷ compressed per layer, for layers over 1 MiB uncompressed (gzip bombs). */
  maxRatio: number;
}

export const DEFAULT_PULL_LIMITS: PullLimits = {
  maxLayers: 128,
  maxCompressedBytes: 8 * 2 ** 30,
  maxUncompressedBytes: 24 * 2 ** 30,
  maxEntries: 1_000_000,
  maxRatio: 100,
};

/** A layer refused for what it holds; the message names the layer and the entry. */
export class HostileLayerError extends Error {
  override name = "HostileLayerError";
}

/** What the layers of one image add up to so far (shared across its layers). */
export interface LayerTally {
  entries: number;
  bytes: number;
}

const GZIP = new Set(["application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip", "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"]);
const PLAIN = new Set(["application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar", "application/vnd.oci.image.layer.nondistributable.v1.tar"]);

/** Why a layer media type cannot be read, or undefined if it can. */
export function unreadableLayerType(mediaType: string): string | undefined {
  if (GZIP.has(mediaType) || PLAIN.has(mediaType)) return undefined;
  if (mediaType.endsWith("+zstd")) return "is zstd-compressed; Cocoon reads gzip and uncompressed layers";
  if (mediaType.includes("foreign")) return "is a foreign (Windows) layer";
  return `has media type ${mediaType.slice(0, 100)}, not a tar layer`;
}

/**
 * Reads a layer blob's tar (gunzipped on the fly, nothing written) and
 * refuses it like a hostile zip: entry names or hard-link targets with `..`
 * (escaping the root), device nodes outside /dev, sparse files, unknown entry types,
 * oversized names, and the image's entry count, total size and this layer's
 * expansion ratio past their limits. Symlinks may point anywhere (an
 * absolute target is normal in a root filesystem): umoci resolves every path
 * inside the root while unpacking. Setuid files are kept; the guest needs
 * them (sudo, ping) and the unpacked tree is never reachable by other users
 * of the host (see rootfs.ts).
 */
export async function checkLayer(blob: string, mediaType: string, compressedBytes: number, label: string, limits: PullLimits, tally: LayerTally): Promise<void> {
  const why = unreadableLayerType(mediaType);
  if (why) throw new HostileLayerError(`layer ${label} ${why}`);
  let layerBytes = 0;
  const refuse = (entry: string, reason: string) => new HostileLayerError(`layer ${label}: entry "${entry.slice(0, 200)}" ${reason}`);
  const source = createReadStream(blob);
  const extract = tar.extract();
  const input = GZIP.has(mediaType) ? source.pipe(createGunzip()) : source;
  source.on("error", (err) => extract.destroy(err));
  input.on("error", (err: Error) => extract.destroy(err));
  input.pipe(extract as unknown as Writable);
  try {
    for await (const entry of extract) {
      const { header } = entry;
      const problem = entryProblem(header);
      if (problem) throw refuse(header.name, problem);
      tally.entries++;
      if (tally.entries > limits.maxEntries) throw refuse(header.name, `takes the image past ${limits.maxEntries} entries`);
      const size = header.size ?? 0;
      tally.bytes += size;
      layerBytes += size;
      if (tally.bytes > limits.maxUncompressedBytes) throw refuse(header.name, `takes the image past its uncompressed limit of ${limits.maxUncompressedBytes} bytes`);
      if (layerBytes > 2 ** 20 && layerBytes > limits.maxRatio * Math.max(1, compressedBytes)) {
        throw refuse(header.name, `makes the layer expand ${Math.round(layerBytes / Math.max(1, compressedBytes))}:1 (limit ${limits.maxRatio}:1): a tar bomb?`);
      }
      entry.resume();
    }
  } catch (err) {
    if (err instanceof HostileLayerError) throw err;
    throw new HostileLayerError(`layer ${label} is not a readable ${GZIP.has(mediaType) ? "gzip " : ""}tar: ${(err as Error).message}`);
  } finally {
    source.destroy();
    extract.destroy();
  }
}

/** Why a tar entry is refused, or undefined. */
export function entryProblem(header: { name: string; type?: string | null; linkname?: string | null; pax?: unknown }): string | undefined {
  const name = header.name;
  if (name.length > 4096) return "has a name longer than 4096 bytes";
  if (pathEscapes(name)) return 'has a ".." path component (escapes the root)';
  if (name.split("/").some((c: string) => Buffer.byteLength(c) > 255)) return "has a path component longer than 255 bytes";
  if (header.pax && typeof header.pax === "object" && Object.keys(header.pax).some((k) => k.startsWith("GNU.sparse."))) return "is a sparse file (not supported)";
  switch (header.type) {
    case "file":
    case "contiguous-file":
    case "directory":
    case "symlink":
    case "fifo":
      return undefined;
    case "link":
      if (!header.linkname || pathEscapes(header.linkname)) return `is a hard link to ${JSON.stringify((header.linkname ?? "").slice(0, 200))}, outside the root`;
      return undefined;
    case "character-device":
    case "block-device":
      // Root filesystem tarballs (debootstrap, mmdebstrap) carry /dev/null, /dev/console…: in the
      // guest a devtmpfs hides them, on the host they sit in a root-only directory. Elsewhere a
      // device node has no business in an image.
      return /^dev\//.test(posix.normalize(`./${name.replace(/^\/+/, "")}`)) ? undefined : "is a device node outside /dev";
    default:
      return `has an unsupported tar entry type (${String(header.type)})`;
  }
}

/** True if a tar path leaves the root once normalized (leading `/` and `./` are the root). */
function pathEscapes(path: string): boolean {
  if (path.includes("\0")) return true;
  const n = posix.normalize(`./${path.replace(/^\/+/, "")}`);
  return n === ".." || n.startsWith("../") || path.split("/").includes("..");
}
