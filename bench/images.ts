/**
 * Image benchmark (`npx tsx bench/images.ts`, as root): build time of the
 * example image (examples/counter-app: apt-get install python3 in the build
 * VM), its size on disk (disk overlay + memory file), and the time from
 * READY to the first HTTP answer of a new VM launched from it. Then, against
 * a docker-registry on loopback (test/support/registry.ts) holding a Debian
 * image with python (two layers made with mmdebstrap): pull + unpack
 * throughput (cold, layers cached, all cached), and the build time of a
 * Python app FROM that registry image vs FROM debian:bookworm with apt-get
 * (BENCH_IMAGE_REGISTRY=0 skips this part). Writes bench/results/images.{json,md}.
 */
import { createReadStream, createWriteStream } from "node:fs";
import { readFile, mkdir, rm, stat, writeFile } from "node:fs/promises";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";
import tar from "tar-stream";
import { ImageService } from "../src/images/service.ts";
import { RegistryEgress } from "../src/images/registry/egress.ts";
import { DEFAULT_PULL_LIMITS } from "../src/images/registry/layers.ts";
import { RegistryPuller } from "../src/images/registry/puller.ts";
import { parseImageReference } from "../src/images/registry/reference.ts";
import { exists } from "../src/util/files.ts";
import { run } from "../src/util/process.ts";
import { startRegistry, writeOciImage } from "../test/support/registry.ts";
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
/** The bench registry runs on loopback: the operator setting that lets pulls reach it. */
const LOOPBACK_REGISTRY = RegistryEgress.allowFromEnv({ COCOON_REGISTRY_PRIVATE_ALLOW: "127.0.0.1" });
const EXAMPLE = new URL("../examples/counter-app/", import.meta.url).pathname;
const REGISTRY = process.env.BENCH_IMAGE_REGISTRY !== "0";
const PULLS = Number(process.env.BENCH_IMAGE_PULLS ?? 3);

/** The Python app of the registry comparison: examples/counter-app's app.py in a venv, from `base`'s packages or apt-get's. */
const pythonApp = (from: string, install: string) =>
  [
    `FROM ${from}`,
    ...(install ? [`RUN ${install}`] : []),
    "RUN python3 -m venv /opt/venv && /opt/venv/bin/pip --version",
    "WORKDIR /app",
    "COPY app.py ./",
    "ENV PORT=8080",
    "EXPOSE 8080",
    'CMD ["/opt/venv/bin/python", "app.py"]',
  ].join("\n");

/**
 * A Debian image with python in two layers, as a registry would hold it: a
 * bookworm minbase tar, then what python3, pip and venv add (the entries of
 * a second mmdebstrap tar that are new or changed). Built once, cached.
 */
async function debianPythonLayout(dir: string): Promise<string> {
  const layout = join(dir, "layout");
  if (await exists(join(layout, "index.json"))) return layout;
  await mkdir(dir, { recursive: true });
  const base = join(dir, "base.tar");
  const full = join(dir, "python-full.tar");
  const layer = join(dir, "python-layer.tar");
  log("mmdebstrap: the base layer and the python layer");
  // Tars left by an interrupted run are reused.
  if (!(await exists(base))) await run("mmdebstrap", ["--variant=minbase", "--include=ca-certificates", "--quiet", "bookworm", base]);
  if (!(await exists(full))) await run("mmdebstrap", ["--variant=minbase", "--include=ca-certificates,python3,python3-pip,python3-venv", "--quiet", "bookworm", full]);
  const seen = new Map<string, string>();
  for await (const e of tarEntries(base)) {
    seen.set(e.header.name, `${e.header.size}:${e.header.mtime?.getTime()}:${e.header.linkname ?? ""}`);
    e.resume();
  }
  const pack = tar.pack();
  const written = new Promise<void>((resolve, reject) => pack.pipe(createWriteStream(layer)).on("finish", resolve).on("error", reject));
  for await (const e of tarEntries(full)) {
    const same = seen.get(e.header.name) === `${e.header.size}:${e.header.mtime?.getTime()}:${e.header.linkname ?? ""}` && e.header.type !== "directory";
    if (same) {
      e.resume();
      continue;
    }
    await new Promise<void>((resolve, reject) => {
      const sink = pack.entry(e.header, (err) => (err ? reject(err) : resolve()));
      (e as unknown as NodeJS.ReadableStream).pipe(sink as unknown as NodeJS.WritableStream);
    });
  }
  pack.finalize();
  await written;
  await writeOciImage(layout, "py", {
    layers: [base, layer],
    config: { Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], Cmd: ["python3"] },
  });
  for (const f of [base, full, layer]) await rm(f, { force: true });
  return layout;
}

function tarEntries(path: string): AsyncIterable<NodeJS.ReadableStream & { header: tar.Header; resume(): void }> {
  const extract = tar.extract();
  createReadStream(path).pipe(extract as unknown as NodeJS.WritableStream);
  return extract as unknown as AsyncIterable<NodeJS.ReadableStream & { header: tar.Header; resume(): void }>;
}

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
  const registry = REGISTRY ? await startRegistry(join(dataDir, "registry")) : undefined;
  const images = new ImageService({
    db,
    engine,
    imagesDir: join(dataDir, "images"),
    rootfs: runtime.rootfs,
    assetsDir: join(root, "assets"),
    registryCaFile: registry?.caFile,
    registryPrivateAllow: LOOPBACK_REGISTRY,
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
    if (registry) lines.push(...(await registryFigures({ registry, images, tenantId: tenant.id, dataDir, results })));
    await writeResults("images", results, lines.join("\n"));
    console.log(lines.join("\n"));
  } finally {
    await registry?.close();
    await images.close();
    for (const vm of engine.list()) await engine.terminate(vm.id).catch(() => undefined);
    await engine.close();
    await db.destroy();
    await rm(dataDir, { recursive: true, force: true });
  }
}

/** Pull + unpack throughput from the loopback registry, and a Python app's build FROM it vs FROM debian:bookworm. */
async function registryFigures(ctx: {
  registry: Awaited<ReturnType<typeof startRegistry>>;
  images: ImageService;
  tenantId: string;
  dataDir: string;
  results: Record<string, unknown>;
}): Promise<string[]> {
  const { registry, images, tenantId, dataDir } = ctx;
  const layout = await debianPythonLayout(join(root, "oci-debian-python"));
  await registry.push(layout, "py", "bench/debian-python:1");
  const reference = `${registry.host}/bench/debian-python:1`;
  const auth = { auths: { [registry.host]: { auth: Buffer.from(`${registry.username}:${registry.password}`).toString("base64") } } };
  const egress = new RegistryEgress(LOOPBACK_REGISTRY);
  const pullDir = join(dataDir, "pull-assets");
  const puller = new RegistryPuller({ assetsDir: pullDir, egress, caFile: registry.caFile, limits: DEFAULT_PULL_LIMITS });
  const pull = () => puller.pull({ ref: parseImageReference(reference)!, auth, log: () => undefined, signal: AbortSignal.timeout(600_000) });
  const cold: number[] = [];
  const layersCached: number[] = [];
  const cached: number[] = [];
  let meta = { bytes: 0, compressed: 0 };
  try {
    for (let i = 0; i < PULLS; i++) {
      await rm(pullDir, { recursive: true, force: true });
      log(`pull + unpack, cold (${i + 1}/${PULLS})`);
      const [pulled, ms] = await timed(pull);
      cold.push(ms);
      const info = JSON.parse(await readFile(join(pulled.disk, "..", "image.json"), "utf8")) as { bytes: number };
      const manifest = JSON.parse(await run("skopeo", ["inspect", "--raw", "--cert-dir", join(dataDir, "registry", "certs"), "--creds", `${registry.username}:${registry.password}`, `docker://${reference}`])) as {
        layers: { size: number }[];
      };
      meta = { bytes: info.bytes, compressed: manifest.layers.reduce((n, l) => n + l.size, 0) };
      await rm(join(pullDir, "oci-rootfs"), { recursive: true, force: true });
      log(`pull + unpack, layers cached (${i + 1}/${PULLS})`);
      layersCached.push((await timed(pull))[1]);
      cached.push((await timed(pull))[1]);
    }
  } finally {
    await egress.close();
  }
  const mbps = (bytes: number, ms: number) => (bytes / 2 ** 20 / (ms / 1000)).toFixed(1);
  await images.registries.put(tenantId, registry.host, registry.username, registry.password);
  const zip = await zipDir(EXAMPLE);
  const build = async (name: string, dockerfile: string): Promise<number> => {
    const staged = join(dataDir, `${name}.zip`);
    await writeFile(staged, zip);
    const started = performance.now();
    const row = await images.create(tenantId, { name, dockerfile, code: { path: staged, sha256: sha256(zip), sizeBytes: zip.length, source: "upload" } });
    for (;;) {
      const cur = await images.get(tenantId, row.id);
      if (cur.state === "READY") return performance.now() - started;
      if (cur.state === "FAILED") throw new Error(`${name}: build failed: ${cur.state_reason}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  };
  log("build FROM the registry image (its disk cached by the first build: the pull is the manifest check)");
  const fromRegistryFirst = await build("py-registry", pythonApp(reference, ""));
  const fromRegistry = await build("py-registry", pythonApp(reference, ""));
  log("build FROM debian:bookworm with apt-get");
  const fromDebian = await build(
    "py-debian",
    pythonApp("debian:bookworm", "apt-get update && apt-get install -y --no-install-recommends python3-pip python3-venv && rm -rf /var/lib/apt/lists/*"),
  );
  ctx.results.registry = {
    image: `${reference}: bookworm minbase layer + python3/pip/venv layer`,
    compressedBytes: meta.compressed,
    unpackedBytes: meta.bytes,
    pullMs: { cold: summarize(cold), layersCached: summarize(layersCached), cached: summarize(cached) },
    buildMs: { fromRegistryFirstPull: fromRegistryFirst, fromRegistry, fromDebianAptGet: fromDebian },
  };
  const c = summarize(cold);
  return [
    "",
    `## FROM a registry image (docker-registry on loopback, TLS + basic auth)`,
    "",
    `Image: Debian bookworm minbase + a python3/pip/venv layer, ${(meta.compressed / 2 ** 20).toFixed(1)} MiB compressed, ${(meta.bytes / 2 ** 20).toFixed(1)} MiB of files.`,
    "",
    "| figure | value |",
    "|---|---|",
    `| pull + check + unpack + ext4 disk, cold, p50 of ${PULLS} | ${(c.p50 / 1000).toFixed(1)} s (${mbps(meta.compressed, c.p50)} MiB/s compressed, ${mbps(meta.bytes, c.p50)} MiB/s of files) |`,
    `| the same with the layers cached (shared blob cache), p50 | ${(summarize(layersCached).p50 / 1000).toFixed(1)} s |`,
    `| the same with the disk cached (manifest check only), p50 | ${(summarize(cached).p50 / 1000).toFixed(2)} s |`,
    `| build of a Python app (venv, app.py) FROM the registry image, first (pull included) | ${(fromRegistryFirst / 1000).toFixed(1)} s |`,
    `| the same build again (disk cached) | ${(fromRegistry / 1000).toFixed(1)} s |`,
    `| the same app FROM debian:bookworm with apt-get install python3-pip python3-venv | ${(fromDebian / 1000).toFixed(1)} s |`,
    "",
  ];
}

await main();
