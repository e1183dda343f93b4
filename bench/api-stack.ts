import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { buildApi } from "../src/api/server.ts";
import { ImageCatalog } from "../src/images/catalog.ts";
import { ImageService } from "../src/images/service.ts";
import { MicroVmService, type HostCapacity } from "../src/lifecycle/microvms.ts";
import { bootstrapAdminKey } from "../src/server/bootstrap.ts";
import { startRuntime } from "../src/server/runtime.ts";
import { openDatabase } from "../src/store/db.ts";
import { ServerSecrets } from "../src/store/secrets.ts";
import { ServerMetrics } from "../src/telemetry/metrics.ts";
import { VmSampler } from "../src/telemetry/vm-samples.ts";

/**
 * The server's parts, wired as `cocoon serve` wires them, on a fresh data
 * directory under `root`; with `tenantImages`, the image service too (tenant
 * images, snapshots); `capacity` replaces the host's admission limits.
 */
export async function startApiStack(opts: {
  root: string;
  dataDirName: string;
  warmPoolSize: number;
  prestartedProcesses?: number;
  log: (line: string) => void;
  tenantImages?: boolean;
  capacity?: HostCapacity;
}) {
  const dataDir = join(opts.root, opts.dataDirName);
  await rm(dataDir, { recursive: true, force: true });
  await mkdir(dataDir, { recursive: true });
  const db = await openDatabase(dataDir);
  const secrets = await ServerSecrets.open(dataDir);
  const adminKey = (await bootstrapAdminKey(db, secrets, dataDir))!;
  const runtime = await startRuntime({ dataDir, assetsDir: join(opts.root, "assets"), warmPoolSize: opts.warmPoolSize, prestartedProcesses: opts.prestartedProcesses, log: opts.log });
  const assetsDir = join(opts.root, "assets");
  const imageService = opts.tenantImages
    ? new ImageService({ db, engine: runtime.engine, imagesDir: join(dataDir, "tenant-images"), rootfs: runtime.rootfs, assetsDir, log: opts.log })
    : undefined;
  await imageService?.start();
  const images = new ImageCatalog(runtime.engine, { db, imagesDir: join(dataDir, "images"), assetsDir, rootfs: runtime.rootfs, assets: runtime.assets, images: imageService, log: opts.log });
  const metrics: ServerMetrics = new ServerMetrics({ vmsByState: () => microvms.countByState(), capacity: () => microvms.usage() });
  const microvms: MicroVmService = new MicroVmService({ db, engine: runtime.engine, images, observer: metrics, log: opts.log, capacity: opts.capacity });
  await microvms.start();
  const app = await buildApi({ db, secrets, microvms, images: imageService, accelerator: runtime.engine.accelerator, metrics, sampler: new VmSampler() });
  await app.listen({ host: "127.0.0.1", port: 0 });
  const port = (app.server.address() as { port: number }).port;
  /** One `/v1` call as the admin; the parsed JSON body. */
  const api = async (method: string, path: string, body?: unknown) => {
    const res = await fetch(`http://127.0.0.1:${port}${path}`, {
      method,
      headers: { authorization: `Bearer ${adminKey}`, ...(body ? { "content-type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    const json = (await res.json()) as any;
    if (res.status >= 400) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
    return json;
  };
  const close = async () => {
    microvms.stop();
    await app.close();
    await imageService?.close();
    for (const v of runtime.engine.list()) await runtime.engine.terminate(v.id).catch(() => undefined);
    await runtime.engine.close();
    await db.destroy();
  };
  return { runtime, microvms, port, api, close };
}
