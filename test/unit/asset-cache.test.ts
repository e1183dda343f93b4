import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
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
});
