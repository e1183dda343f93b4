import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, inject } from "vitest";
import type { Api } from "../../src/api/fastify.ts";
import { buildApi, type ApiDeps } from "../../src/api/server.ts";
import { ImageCatalog } from "../../src/images/catalog.ts";
import { ImageService, type ImageServiceOpts } from "../../src/images/service.ts";
import { MicroVmService, type HostCapacity } from "../../src/lifecycle/microvms.ts";
import { openDatabase, type Db } from "../../src/store/db.ts";
import { ServerSecrets } from "../../src/store/secrets.ts";
import { ServerMetrics } from "../../src/telemetry/metrics.ts";
import { VmSampler } from "../../src/telemetry/vm-samples.ts";
import { bootstrapAdminKey } from "../../src/server/bootstrap.ts";
import { Engine } from "../../src/vmm/engine.ts";
import type { JailConfig } from "../../src/vmm/jail/index.ts";
import { engineConfig } from "./engine-fixture.ts";
import { TEST_ASSETS, TEST_IMAGES, TEST_ROOT } from "./paths.ts";

export interface ApiContext {
  url: string;
  adminKey: string;
  db: Db;
  engine: Engine;
  microvms: MicroVmService;
  /** Dockerfile images (their files under the fixture's own data directory). */
  images: ImageService;
  /** The server's master key (store/secrets.ts). */
  secrets: ServerSecrets;
  /** Sends a request; JSON bodies are encoded, JSON answers decoded. */
  call(method: string, path: string, opts?: { key?: string; body?: unknown; raw?: string | Buffer; headers?: Record<string, string> }): Promise<{ status: number; body: any; text: string }>;
  /** Creates a tenant and a key for it with the given permissions. */
  tenantKey(name: string, permissions?: string[]): Promise<string>;
}

/**
 * The real API over real HTTP on a loopback port, with a real database and
 * engine (the shared base snapshot as the `base` image). Everything is
 * terminated and removed after the file.
 */
export async function useApi(
  opts: {
    capacity?: HostCapacity;
    /** The engine's QEMU jail (default: from the environment). */
    jail?: JailConfig;
    /** Receives the engine's log lines. */
    log?: (line: string) => void;
    policyIntervalMs?: number;
    images?: Partial<Omit<ImageServiceOpts, "db" | "engine">>;
    /** API options (request timeouts, a log stream to inspect). */
    api?: Pick<ApiDeps, "timeouts" | "logger" | "logStream" | "execOutputBudgetBytes">;
  } = {},
): Promise<ApiContext> {
  const dataDir = await mkdtemp(join(TEST_ROOT, "api-"));
  const db = await openDatabase(dataDir);
  const secrets = await ServerSecrets.open(dataDir);
  const adminKey = (await bootstrapAdminKey(db, secrets, dataDir))!;
  const engine = await Engine.open({ ...engineConfig(dataDir), jail: opts.jail, log: opts.log });
  const assets = { kernel: inject("kernel"), initramfs: inject("initramfs") };
  // The shared images directory: the default shape's snapshot is already built there.
  const imageService = new ImageService({
    db,
    engine,
    imagesDir: join(dataDir, "images"),
    rootfs: inject("rootfs"),
    assetsDir: TEST_ASSETS,
    ...opts.images,
  });
  await imageService.start();
  const images = new ImageCatalog(engine, { db, imagesDir: TEST_IMAGES, assetsDir: TEST_ASSETS, rootfs: inject("rootfs"), assets, images: imageService });
  const metrics: ServerMetrics = new ServerMetrics({ vmsByState: () => microvms.countByState(), capacity: () => microvms.usage() });
  const microvms: MicroVmService = new MicroVmService({ db, engine, images, capacity: opts.capacity, observer: metrics });
  await microvms.start(opts.policyIntervalMs ?? 250);
  const app: Api = await buildApi({
    db,
    secrets,
    microvms,
    images: imageService,
    accelerator: engine.accelerator,
    jail: engine.jailer,
    metrics,
    sampler: new VmSampler(),
    logger: process.env.COCOON_TEST_LOG === "1",
    // Every answer in every test is checked against the OpenAPI document's schemas.
    checkAnswers: true,
    ...opts.api,
  });
  const address = await app.listen({ host: "127.0.0.1", port: 0 });
  const ctx: ApiContext = {
    url: address,
    adminKey,
    db,
    engine,
    microvms,
    images: imageService,
    secrets,
    async call(method, path, o = {}) {
      const headers: Record<string, string> = { ...o.headers };
      if (o.key) headers.authorization = `Bearer ${o.key}`;
      let body: string | Buffer | undefined = o.raw;
      if (o.body !== undefined) {
        body = JSON.stringify(o.body);
        headers["content-type"] = "application/json";
      }
      const res = await fetch(`${address}${path}`, { method, headers, body: body as BodyInit | undefined });
      const text = await res.text();
      let parsed: unknown = text;
      try {
        parsed = JSON.parse(text);
      } catch {
        // not JSON
      }
      return { status: res.status, body: parsed, text };
    },
    async tenantKey(name, permissions = ["microvm:*", "image:read"]) {
      await ctx.call("POST", "/v1/tenants", { key: adminKey, body: { name } });
      const res = await ctx.call("POST", "/v1/keys", { key: adminKey, body: { tenant: name, permissions } });
      return res.body.apiKey as string;
    },
  };
  afterAll(async () => {
    microvms.stop();
    await app.close();
    await imageService.close();
    for (const vm of engine.list()) await engine.terminate(vm.id).catch(() => undefined);
    await engine.close();
    await db.destroy();
    await rm(dataDir, { recursive: true, force: true });
  });
  return ctx;
}
