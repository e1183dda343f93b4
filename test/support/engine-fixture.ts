import { mkdtemp, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, afterEach, beforeEach, inject } from "vitest";
import { Engine, type Snapshot } from "../../src/vmm/engine.ts";
import { machinePaths } from "../../src/vmm/qemu.ts";
import { TEST_ROOT } from "./paths.ts";

export interface EngineContext {
  engine: Engine;
  dataDir: string;
  snapshot: Snapshot;
  /** Opens another engine over the same data directory (a restarted server). */
  reopen(): Promise<Engine>;
}

export const engineConfig = (dataDir: string) => ({
  dataDir,
  assets: { kernel: inject("kernel"), initramfs: inject("initramfs") },
  accelerator: inject("accelerator"),
});

/**
 * One engine over a fresh data directory per test file, on the shared base
 * snapshot. When a test fails, its VMs are named with the tail of their
 * console; after each test every VM is terminated.
 */
export async function useEngine(): Promise<EngineContext> {
  const dataDir = await mkdtemp(join(TEST_ROOT, "e-"));
  const engine = await Engine.open(engineConfig(dataDir));
  const ctx: EngineContext = {
    engine,
    dataDir,
    snapshot: await engine.loadSnapshot(inject("baseSnapshotDir")),
    reopen: async () => {
      await ctx.engine.close();
      ctx.engine = await Engine.open(engineConfig(dataDir));
      return ctx.engine;
    },
  };
  beforeEach(({ onTestFailed }) => {
    onTestFailed(async () => {
      for (const vm of ctx.engine.list()) {
        const console = await readFile(machinePaths(vm.dir).console, "utf8").catch(() => "(no console)");
        process.stderr.write(`[vm ${vm.id} ${vm.status}] console tail:\n${console.slice(-2000)}\n`);
      }
    });
  });
  afterEach(async () => {
    for (const vm of ctx.engine.list()) await ctx.engine.terminate(vm.id).catch(() => undefined);
  });
  afterAll(async () => {
    for (const vm of ctx.engine.list()) await ctx.engine.terminate(vm.id).catch(() => undefined);
    await rm(dataDir, { recursive: true, force: true });
  });
  return ctx;
}
