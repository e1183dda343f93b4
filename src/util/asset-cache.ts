import { mkdir, rm, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { exists, fsyncDir, sha256 } from "./files.ts";

export type ProgressLog = (line: string) => void;

export interface CachedAssetSpec {
  /** Directory holding every version of every asset. */
  assetsDir: string;
  /** Asset name, e.g. "kernel"; versions live in `<assetsDir>/<name>/<key>/`. */
  name: string;
  /** Everything the build depends on; any change gives a new key and a rebuild. */
  inputs: Record<string, unknown>;
  /** Fills `dir` with the asset. Runs only on a cache miss. */
  build: (dir: string) => Promise<void>;
  log?: ProgressLog;
}

/** Builds in progress in this process, by directory: concurrent callers share one build. */
const inProgress = new Map<string, Promise<string>>();

/**
 * Returns the directory of an asset built from `inputs`, building it once
 * (callers asking for the same asset at the same time share the build).
 * A version is published by renaming a finished temp directory, so a crash
 * mid-build never leaves a half-built asset that looks complete. Old
 * versions are kept: snapshots and images keep referring to the kernel and
 * disks they were made with.
 */
export async function cachedAsset(spec: CachedAssetSpec): Promise<string> {
  const key = sha256(JSON.stringify(spec.inputs)).slice(0, 16);
  const dir = join(spec.assetsDir, spec.name, key);
  if (await exists(join(dir, "inputs.json"))) return dir;
  const running = inProgress.get(dir);
  if (running) return running;
  const build = buildAsset(spec, key, dir).finally(() => inProgress.delete(dir));
  inProgress.set(dir, build);
  return build;
}

async function buildAsset(spec: CachedAssetSpec, key: string, dir: string): Promise<string> {
  const tmp = `${dir}.building-${process.pid}`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  spec.log?.(`building ${spec.name} (${key})`);
  const started = Date.now();
  try {
    await spec.build(tmp);
    await writeFile(join(tmp, "inputs.json"), JSON.stringify(spec.inputs, null, 2));
    await rm(dir, { recursive: true, force: true });
    await rename(tmp, dir);
    await fsyncDir(join(spec.assetsDir, spec.name));
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
  spec.log?.(`built ${spec.name} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return dir;
}
