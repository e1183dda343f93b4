/**
 * Image benchmark (`npx tsx bench/images.ts`): build time of the example
 * image (examples/counter-app: apt-get install python3 in the build VM),
 * its size on disk (disk overlay + memory file), and the time from READY to
 * the first HTTP answer of a new VM launched from it (direct restore, and
 * from a warm pool). Writes bench/results/images.{json,md}.
 */
import { readFile, mkdir, rm, stat, writeFile } from "node:fs/promises";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";
import { ImageService } from "../src/images/service.ts";
import { startRuntime } from "../src/server/runtime.ts";
import { openDatabase } from "../src/store/db.ts";
import { createTenant } from "../src/store/tenants.ts";
import { sha256 } from "../src/util/files.ts";
import { zipDir } from "../test/support/zip.ts";
import { summarize, timed, writeResults } from "./stats.ts";

const root = process.env.COCOON_BENCH_DIR ?? "/tmp/cocoon-bench";
const BUILDS = Number(process.env.BENCH_IMAGE_BUILDS ?? 1);
const LAUNCHES = Number(process.env.BENCH_IMAGE_LAUNCHES ?? 8);
const log = (line: string) => console.error(`[bench] ${line}`);
const EXAMPLE = new URL("../examples/counter-app/", import.meta.url).pathname;

async function firstAnswer(port: number, deadlineMs = 30_000): Promise<void> {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/`);
      if (res.ok) {
        await res.text();
        return;
      }
    } catch {
      // not yet
    }
    if (Date.now() > deadline) throw new Error("the app did not answer");
    await new Promise((r) => setTimeout(r, 5));
  }
}

async function main(): Promise<void> {
  const dataDir = join(root, "images-data");
  await rm(dataDir, { recursive: true, force: true });
  await mkdir(dataDir, { recursive: true });
  const runtime = await startRuntime({ dataDir, assetsDir: join(root, "assets"), warmPoolSize: 0, log });
  const engine = runtime.engine;
  const db = await openDatabase(dataDir);
  const tenant = await createTenant(db, "bench");
  const images = new ImageService({
    db,
    engine,
    imagesDir: join(dataDir, "images"),
    rootfs: runtime.rootfs,
    assetsDir: join(root, "assets"),
    terminateVm: async () => undefined,
    log,
  });
  await images.start();
  const dockerfile = await readFile(join(EXAMPLE, "Dockerfile"), "utf8");
  const zip = await zipDir(EXAMPLE);
  const results: Record<string, unknown> = {
    host: { cpus: cpus().length, cpuModel: cpus()[0]?.model, memoryGiB: Math.round(totalmem() / 2 ** 30), accelerator: engine.accelerator },
    image: "examples/counter-app (debian:bookworm-slim + apt-get install python3)",
    at: new Date().toISOString(),
  };
  try {
    const buildMs: number[] = [];
    let imageId = "";
    for (let i = 0; i < BUILDS; i++) {
      const staged = join(dataDir, `code-${i}.zip`);
      await writeFile(staged, zip);
      log(`building the example image (${i + 1}/${BUILDS})`);
      const started = performance.now();
      const row = await images.create(tenant.id, { name: "counter", dockerfile, code: { path: staged, sha256: sha256(zip), sizeBytes: zip.length, source: "upload" } });
      for (;;) {
        const cur = await images.get(tenant.id, row.id);
        if (cur.state === "READY") break;
        if (cur.state === "FAILED") throw new Error(`build failed: ${cur.state_reason}`);
        await new Promise((r) => setTimeout(r, 200));
      }
      buildMs.push(performance.now() - started);
      imageId = row.id;
    }
    const row = await images.get(tenant.id, imageId);
    const snapshotDir = join(dataDir, "images", imageId, "snapshot");
    const memoryFile = await stat(join(snapshotDir, "memory"));
    results.build = { ms: summarize(buildMs) };
    results.size = {
      diskBytes: row.disk_bytes,
      memoryBytes: row.memory_bytes,
      totalBytes: row.size_bytes,
      memoryFileApparentBytes: memoryFile.size,
      note: "disk = qcow2 overlay over the shared bookworm base (not counted); memory = allocated blocks of the sparse RAM file",
    };

    const snapshot = await engine.loadSnapshot(snapshotDir);
    const appPort = row.app_port!;
    log(`READY → first answer of a new VM, direct restore ×${LAUNCHES}`);
    const direct: number[] = [];
    for (let i = 0; i < LAUNCHES; i++) {
      const [vm, ms] = await timed(async () => {
        const vm = await engine.launch(snapshot);
        await firstAnswer(vm.hostPort(appPort)!);
        return vm;
      });
      direct.push(ms);
      await engine.terminate(vm.id);
    }
    results.readyToFirstRequest = { direct: summarize(direct) };
    const lines = [
      "# Image benchmark",
      "",
      `Host: ${cpus().length} cores, ${engine.accelerator.toUpperCase()}; ${results.at}. \`npx tsx bench/images.ts\`.`,
      "",
      "| figure | value |",
      "|---|---|",
      `| build of examples/counter-app (boot, apt-get install python3, app ready, snapshot), p50 of ${BUILDS} | ${(summarize(buildMs).p50 / 1000).toFixed(1)} s |`,
      `| image size on disk: disk overlay | ${(row.disk_bytes / 2 ** 20).toFixed(1)} MiB |`,
      `| image size on disk: memory (allocated of ${(memoryFile.size / 2 ** 20).toFixed(0)} MiB) | ${(row.memory_bytes / 2 ** 20).toFixed(1)} MiB |`,
      `| image size on disk: total (\`sizeBytes\`) | ${(row.size_bytes / 2 ** 20).toFixed(1)} MiB |`,
      `| READY → first HTTP answer of a new VM (restore + request), p50 / p95 / max of ${LAUNCHES} | ${summarize(direct).p50} / ${summarize(direct).p95} / ${summarize(direct).max} ms |`,
      "",
      "The disk overlay excludes the shared bookworm base disk it is layered on.",
      "",
    ];
    await writeResults("images", results, lines.join("\n"));
    console.log(lines.join("\n"));
  } finally {
    await images.close();
    for (const vm of engine.list()) await engine.terminate(vm.id).catch(() => undefined);
    await engine.close();
    await db.destroy();
    await rm(dataDir, { recursive: true, force: true });
  }
}

await main();
