import dockerignoreModule from "@balena/dockerignore";
import { posix } from "node:path";
import type { Readable } from "node:stream";
import tar from "tar-stream";
import yauzl from "yauzl";
import { ApiError } from "../errors.ts";

/** Limits on a code archive (zip bombs, huge contexts). Checked before any build starts. */
export interface ArchiveLimits {
  /** The .zip itself (upload, S3 object or URL body). */
  maxCompressedBytes: number;
  /** Sum of the entries' uncompressed sizes. */
  maxUncompressedBytes: number;
  maxEntries: number;
  /** Uncompressed ÷ compressed, for any entry larger than 1 MiB uncompressed, and for the whole archive. */
  maxRatio: number;
}

export const DEFAULT_ARCHIVE_LIMITS: ArchiveLimits = {
  maxCompressedBytes: 256 * 2 ** 20,
  maxUncompressedBytes: 1024 * 2 ** 20,
  maxEntries: 20_000,
  maxRatio: 100,
};

/** An entry of the build context: a path relative to the archive root, never absolute, never with `..`. */
export interface ContextEntry {
  path: string;
  type: "file" | "dir" | "symlink";
  mode: number;
  size: number;
  /** For symlinks: the target, checked to stay inside the archive. */
  linkTarget?: string;
  /** The zip entry it is read from (absent for directories the archive only implies). */
  zipEntry?: yauzl.Entry;
}

/** A validated code archive: what COPY and ADD can read, after `.dockerignore`. */
export interface CodeArchive {
  entries: ContextEntry[];
  /** The Dockerfile found at the archive root, if any (used when the request has none). */
  dockerfile?: string;
  uncompressedBytes: number;
}

// A CommonJS module whose exports carry a `default` too: TS and Node agree on `.default`.
const dockerignore = dockerignoreModule.default;

const S_IFMT = 0o170000;
const S_IFLNK = 0o120000;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;

function refuse(entry: string, why: string): never {
  throw new ApiError("ValidationError", `code archive entry "${entry}" ${why}`, { field: "code", entry });
}

/**
 * Reads and checks a zip's central directory without extracting anything on
 * the host: entry count, sizes and compression ratios (zip bombs), and every
 * name (absolute paths, `..`, backslashes, NUL) and symlink target (absolute,
 * or escaping the archive) — a refusal names the entry. Then applies the
 * archive's `.dockerignore`. Sizes are the declared ones; yauzl checks the
 * actual sizes against them when entries are read (validateEntrySizes).
 */
export async function inspectArchive(zipPath: string, compressedBytes: number, limits: ArchiveLimits = DEFAULT_ARCHIVE_LIMITS): Promise<CodeArchive> {
  if (compressedBytes > limits.maxCompressedBytes) {
    throw new ApiError("PayloadTooLarge", `the code archive is ${compressedBytes} bytes; the limit is ${limits.maxCompressedBytes}`, { field: "code" });
  }
  let zip: yauzl.ZipFile;
  try {
    zip = await yauzl.openPromise(zipPath, { lazyEntries: true, decodeStrings: false, validateEntrySizes: true, autoClose: false });
  } catch (err) {
    throw new ApiError("ValidationError", `the code is not a valid zip archive: ${(err as Error).message}`, { field: "code" });
  }
  try {
    if (zip.entryCount > limits.maxEntries) {
      throw new ApiError("ValidationError", `the code archive has ${zip.entryCount} entries; the limit is ${limits.maxEntries}`, { field: "code" });
    }
    const byPath = new Map<string, ContextEntry>();
    let total = 0;
    for await (const entry of entriesOf(zip)) {
      const raw = decodeName(entry);
      const name = checkName(raw);
      const mode = (entry.externalFileAttributes >>> 16) & 0xffff;
      const fmt = mode & S_IFMT;
      const isDir = raw.endsWith("/") || fmt === S_IFDIR;
      if (fmt !== 0 && fmt !== S_IFREG && fmt !== S_IFDIR && fmt !== S_IFLNK) refuse(raw, "is a device, FIFO or socket");
      total += entry.uncompressedSize;
      if (total > limits.maxUncompressedBytes) {
        refuse(raw, `takes the archive past its uncompressed limit of ${limits.maxUncompressedBytes} bytes`);
      }
      if (entry.uncompressedSize > 2 ** 20 && entry.uncompressedSize > limits.maxRatio * Math.max(1, entry.compressedSize)) {
        refuse(raw, `expands ${Math.round(entry.uncompressedSize / Math.max(1, entry.compressedSize))}:1 (limit ${limits.maxRatio}:1): a zip bomb?`);
      }
      if (name === "") continue; // "./"
      if (fmt === S_IFLNK) {
        if (entry.uncompressedSize > 4096) refuse(raw, "is a symlink with an oversized target");
        const target = (await readEntry(zip, entry)).toString("utf8");
        if (target.startsWith("/") || target.includes("\0")) refuse(raw, `is a symlink to an absolute path (${target})`);
        const resolved = posix.normalize(posix.join(posix.dirname(name), target));
        if (resolved === ".." || resolved.startsWith("../")) refuse(raw, `is a symlink pointing outside the archive (${target})`);
        byPath.set(name, { path: name, type: "symlink", mode: 0o777, size: 0, linkTarget: target, zipEntry: entry });
      } else if (isDir) {
        byPath.set(name, { path: name, type: "dir", mode: (mode & 0o7777) || 0o755, size: 0 });
      } else {
        byPath.set(name, { path: name, type: "file", mode: (mode & 0o7777) || 0o644, size: entry.uncompressedSize, zipEntry: entry });
      }
    }
    if (total > limits.maxRatio * Math.max(1, compressedBytes) && total > 2 ** 20) {
      throw new ApiError("ValidationError", `the code archive expands ${Math.round(total / compressedBytes)}:1 (limit ${limits.maxRatio}:1): a zip bomb?`, { field: "code" });
    }
    // A file inside a symlinked directory would be written through the link.
    for (const e of byPath.values()) {
      for (let dir = posix.dirname(e.path); dir !== "."; dir = posix.dirname(dir)) {
        if (byPath.get(dir)?.type === "symlink") refuse(e.path, `lies under the symlink ${dir}`);
      }
    }
    const read = async (p: string) => {
      const e = byPath.get(p);
      return e?.type === "file" && e.zipEntry && e.size <= 2 ** 20 ? (await readEntry(zip, e.zipEntry)).toString("utf8") : undefined;
    };
    const ignoreText = await read(".dockerignore");
    const dockerfile = await read("Dockerfile");
    let entries = [...byPath.values()];
    if (ignoreText) {
      const ig = dockerignore({ ignorecase: false }).add(ignoreText.split(/\r?\n/));
      entries = entries.filter((e) => !ig.ignores(e.type === "dir" ? `${e.path}/` : e.path));
    }
    return { entries: withParents(entries), dockerfile, uncompressedBytes: total };
  } finally {
    // Entries are read again when the context is streamed; the zip is reopened then.
    zip.close();
  }
}

/**
 * Streams the context as a tar (uid/gid 0, modes kept) for the build VM to
 * unpack. Reads the zip again; entry sizes are checked as they are read.
 */
export function contextTar(zipPath: string, archive: CodeArchive): Readable {
  const pack = tar.pack();
  void (async () => {
    const zip = await yauzl.openPromise(zipPath, { lazyEntries: true, decodeStrings: false, validateEntrySizes: true, autoClose: false });
    try {
      const byOffset = new Map<number, yauzl.Entry>();
      for await (const entry of entriesOf(zip)) byOffset.set(entry.relativeOffsetOfLocalHeader, entry);
      for (const e of archive.entries) {
        const header = { name: e.path, mode: e.mode, uid: 0, gid: 0, mtime: new Date(0) };
        if (e.type === "dir") pack.entry({ ...header, type: "directory" });
        else if (e.type === "symlink") pack.entry({ ...header, type: "symlink", linkname: e.linkTarget });
        else {
          const entry = byOffset.get(e.zipEntry!.relativeOffsetOfLocalHeader)!;
          const data = await zip.openReadStreamPromise(entry);
          await new Promise<void>((resolve, reject) => {
            const sink = pack.entry({ ...header, type: "file", size: e.size }, (err) => (err ? reject(err) : resolve()));
            data.on("error", reject).pipe(sink);
          });
        }
      }
      pack.finalize();
    } catch (err) {
      pack.destroy(err as Error);
    } finally {
      zip.close();
    }
  })().catch((err: Error) => pack.destroy(err));
  return pack as unknown as Readable;
}

async function* entriesOf(zip: yauzl.ZipFile): AsyncGenerator<yauzl.Entry> {
  for (;;) {
    const next = await new Promise<yauzl.Entry | undefined>((resolve, reject) => {
      const onEntry = (e: yauzl.Entry) => done(e);
      const onEnd = () => done(undefined);
      const onError = (err: Error) => {
        cleanup();
        reject(new ApiError("ValidationError", `the code archive is corrupt: ${err.message}`, { field: "code" }));
      };
      const cleanup = () => zip.off("entry", onEntry).off("end", onEnd).off("error", onError);
      const done = (e: yauzl.Entry | undefined) => {
        cleanup();
        resolve(e);
      };
      zip.on("entry", onEntry).on("end", onEnd).on("error", onError);
      zip.readEntry();
    });
    if (!next) return;
    yield next;
  }
}

async function readEntry(zip: yauzl.ZipFile, entry: yauzl.Entry): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of await zip.openReadStreamPromise(entry)) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

/** Zip names are UTF-8 when general purpose bit 11 is set, else CP437 (read as latin1: the checks only care about ASCII). */
function decodeName(entry: yauzl.Entry): string {
  const raw = entry.fileName as unknown as Buffer;
  return raw.toString(entry.generalPurposeBitFlag & 0x800 ? "utf8" : "latin1");
}

/** The normalized relative path of an entry name, or a refusal naming it. */
export function checkName(raw: string): string {
  if (raw.includes("\0")) refuse(raw, "has a NUL in its name");
  if (raw.includes("\\")) refuse(raw, "has a backslash in its name (Windows paths are refused)");
  if (raw.startsWith("/") || /^[A-Za-z]:/.test(raw)) refuse(raw, "has an absolute path");
  if (raw.split("/").includes("..")) refuse(raw, 'has a ".." path component (zip slip)');
  const name = posix.normalize(raw).replace(/\/+$/, "");
  return name === "." ? "" : name;
}

/** Adds the directories implied by entry paths, parents first. */
function withParents(entries: ContextEntry[]): ContextEntry[] {
  const seen = new Set(entries.map((e) => e.path));
  const dirs: ContextEntry[] = [];
  for (const e of entries) {
    for (let dir = posix.dirname(e.path); dir !== "." && !seen.has(dir); dir = posix.dirname(dir)) {
      seen.add(dir);
      dirs.push({ path: dir, type: "dir", mode: 0o755, size: 0 });
    }
  }
  return [...dirs, ...entries].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}
