import { randomBytes } from "node:crypto";
import { mkdir, readdir, rm, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { exists, fsyncDir, sha256 } from "./files.ts";
import { isAlive } from "./process.ts";

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

/** Builds under way in this process, by target directory: one build per asset at a time. */
const building = new Map<string, Promise<string>>();

/**
 * Returns the directory of an asset built from `inputs`, building it once.
 * Callers in this process asking for the same asset while it builds share
 * that build. Each build works in a directory of its own and publishes it by
 * an atomic rename, so a crash mid-build never leaves a half-built asset that
 * looks complete, and another process building the same asset at the same
 * time loses nothing (the first rename wins, the other is discarded). Old
 * versions are kept: snapshots and images keep referring to the kernel and
 * disks they were made with.
 */
export function cachedAsset(spec: CachedAssetSpec): Promise<string> {
  const key = assetKey(spec.inputs);
  const dir = join(spec.assetsDir, spec.name, key);
  const running = building.get(dir);
  if (running) return running;
  const build = buildOnce(spec, key, dir).finally(() => building.delete(dir));
  building.set(dir, build);
  return build;
}

/** The key of an asset built from `inputs`: its version directory's name. */
export function assetKey(inputs: Record<string, unknown>): string {
  return sha256(JSON.stringify(inputs)).slice(0, 16);
}

async function buildOnce(spec: CachedAssetSpec, key: string, dir: string): Promise<string> {
  const parent = join(spec.assetsDir, spec.name);
  await mkdir(parent, { recursive: true });
  await removeAbandonedBuilds(parent);
  if (await exists(join(dir, "inputs.json"))) return dir;
  const tmp = `${dir}.building-${process.pid}-${randomBytes(4).toString("hex")}`;
  await mkdir(tmp);
  spec.log?.(`building ${spec.name} (${key})`);
  const started = Date.now();
  try {
    await spec.build(tmp);
    await writeFile(join(tmp, "inputs.json"), JSON.stringify(spec.inputs, null, 2));
    if (await exists(join(dir, "inputs.json"))) {
      // Another process published it first: theirs is as good as ours.
      await rm(tmp, { recursive: true, force: true });
      return dir;
    }
    await rm(dir, { recursive: true, force: true }); // an unfinished directory of an older layout
    await rename(tmp, dir);
    await fsyncDir(parent);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    if (await exists(join(dir, "inputs.json"))) return dir; // lost a rename race to a finished build
    throw err;
  }
  spec.log?.(`built ${spec.name} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return dir;
}

/** Removes the build directories (of any version of the asset) left by processes that are gone: killed mid-build. */
async function removeAbandonedBuilds(parent: string): Promise<void> {
  for (const name of await readdir(parent)) {
    const pid = Number(/^[0-9a-f]+\.building-(\d+)(-|$)/.exec(name)?.[1]);
    if (pid && !isAlive(pid)) await rm(join(parent, name), { recursive: true, force: true });
  }
}
