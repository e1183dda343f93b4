import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { cachedAsset } from "../../src/util/asset-cache.ts";

describe("cachedAsset", () => {
  it("builds once per set of inputs, reuses it, rebuilds when an input changes, and publishes nothing on failure", async () => {
    const assetsDir = await mkdtemp(join(tmpdir(), "assets-"));
    let builds = 0;
    const spec = (version: string) => ({
      assetsDir,
      name: "thing",
      inputs: { version },
      build: async (dir: string) => {
        builds++;
        await writeFile(join(dir, "out"), version);
      },
    });
    const a = await cachedAsset(spec("1"));
    expect(await cachedAsset(spec("1"))).toBe(a);
    expect(builds).toBe(1);
    const b = await cachedAsset(spec("2"));
    expect(b).not.toBe(a);
    expect(await readFile(join(b, "out"), "utf8")).toBe("2");
    expect(builds).toBe(2);

    const failing = { ...spec("3"), build: async () => Promise.reject(new Error("boom")) };
    await expect(cachedAsset(failing)).rejects.toThrow("boom");
    await expect(cachedAsset(spec("3"))).resolves.toContain("thing");
    expect(builds).toBe(3);
    await rm(assetsDir, { recursive: true, force: true });
  });

  it("shares one build among concurrent callers, each build in a directory of its own", async () => {
    const assetsDir = await mkdtemp(join(tmpdir(), "assets-"));
    let builds = 0;
    const seen = new Set<string>();
    const spec = {
      assetsDir,
      name: "shape",
      inputs: { memoryMiB: 768 },
      build: async (dir: string) => {
        builds++;
        seen.add(dir);
        await new Promise((r) => setTimeout(r, 50));
        await writeFile(join(dir, "disk"), "x");
      },
    };
    const dirs = await Promise.all(Array.from({ length: 24 }, () => cachedAsset(spec)));
    expect(new Set(dirs).size).toBe(1);
    expect(builds).toBe(1);
    // Another process's build of the same asset at the same time uses its own directory, and
    // publishing one after the other keeps the first: simulate the second finishing late.
    const late = { ...spec, inputs: { memoryMiB: 1024 } };
    const first = await cachedAsset(late);
    await rm(join(first, "inputs.json"));
    const second = await cachedAsset(late);
    expect(second).toBe(first);
    expect(seen.size).toBe(3);
    expect((await readdir(join(assetsDir, "shape"))).filter((n) => n.includes(".building-"))).toEqual([]);
    await rm(assetsDir, { recursive: true, force: true });
  });

  it("removes the build directories of processes that are gone (any version of the asset), and only theirs", async () => {
    const assetsDir = await mkdtemp(join(tmpdir(), "assets-"));
    const spec = { assetsDir, name: "thing", inputs: { v: 1 }, build: async (dir: string) => writeFile(join(dir, "out"), "1") };
    const key = (await cachedAsset(spec)).split("/").pop()!;
    await rm(join(assetsDir, "thing", key), { recursive: true });
    const dead = join(assetsDir, "thing", `0123456789abcdef.building-999999999-abcd`);
    const alive = join(assetsDir, "thing", `${key}.building-${process.pid}-abcd`);
    await mkdir(dead);
    await mkdir(alive);
    await cachedAsset(spec);
    const left = await readdir(join(assetsDir, "thing"));
    expect(left).not.toContain(dead.split("/").pop());
    expect(left).toContain(alive.split("/").pop());
    await rm(assetsDir, { recursive: true, force: true });
  });
});
