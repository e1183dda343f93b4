import { randomBytes } from "node:crypto";
import { chmod, mkdir, readFile } from "node:fs/promises";
import { cpus } from "node:os";
import { join } from "node:path";
import { buildApi, currentRequestId } from "../api/server.ts";
import { ImageCatalog } from "../images/catalog.ts";
import { s3ConfigFromEnv } from "../images/intake.ts";
import { ImageService } from "../images/service.ts";
import { ClusterNode } from "../lifecycle/cluster.ts";
import { LeaseFence } from "../lifecycle/lease-fence.ts";
import { SuspendedObjects } from "../lifecycle/suspended-objects.ts";
import { BucketSweep, SWEEP_GRACE_SECONDS, SWEEP_MAX_KEYS } from "../store/bucket-sweep.ts";
import { ObjectStore } from "../store/objects.ts";
import { NodeChannel } from "../router/node-channel.ts";
import { hostCapacity, MicroVmService } from "../lifecycle/microvms.ts";
import { closeDatabase, openDatabase, openPostgres } from "../store/db.ts";
import { ServerSecrets } from "../store/secrets.ts";
import { ServerMetrics } from "../telemetry/metrics.ts";
import { VmSampler } from "../telemetry/vm-samples.ts";
import { bootstrapAdminKey } from "./bootstrap.ts";
import { resolveServerConfig } from "./config.ts";
import { startRuntime } from "./runtime.ts";
import { writeFileAtomic } from "../util/files.ts";
import { qemuBuild } from "../vmm/snapshot.ts";

/** `cocoon server`: prepares assets, re-adopts VMs, serves the API until SIGINT/SIGTERM. */
export async function runServer(flags: { listen?: string; dataDir?: string; metricsPublic?: boolean }): Promise<void> {
  const config = resolveServerConfig(flags);
  const log = (line: string) => console.error(`[cocoon] ${line}`);
  if (config.objectStore && !config.databaseUrl) throw new Error("COCOON_OBJECT_STORE_URL is for a cluster: it needs COCOON_DATABASE_URL");
  // Last resort: a fault no code path handles is logged with what is known of
  // it and the server keeps serving the other requests and VMs. Known cases
  // never rely on this: each is handled (and tested) where it happens.
  process.on("unhandledRejection", (reason) => log(`BUG: unhandled rejection (kept serving): ${describeFault(reason)}`));
  process.on("uncaughtException", (err, origin) => log(`BUG: uncaught exception in ${origin} (kept serving): ${describeFault(err)}`));
  log(`data directory ${config.dataDir}`);
  // Keys, records and saved VM memory live here: the server's alone.
  await mkdir(config.dataDir, { recursive: true, mode: 0o700 });
  await chmod(config.dataDir, 0o700);
  // Single host: SQLite in the data directory. Many hosts: the PostgreSQL they share (docs/cluster.md).
  const db = config.databaseUrl ? await openPostgres(config.databaseUrl, { log }) : await openDatabase(config.dataDir);
  const secrets = await ServerSecrets.open(config.dataDir);
  const adminKey = await bootstrapAdminKey(db, secrets, config.dataDir);
  if (adminKey) log(`created the admin API key (also in ${config.dataDir}/admin.key; shown once): ${adminKey}`);
  // Many hosts: this server is a node of a cluster (docs/cluster.md).
  const nodeId = config.databaseUrl ? (config.nodeId ?? (await persistentNodeId(config.dataDir))) : undefined;
  // A cluster's object store: suspended VMs and images published there move to any node (docs/cluster.md).
  const objectStore = config.objectStore ? new ObjectStore(config.objectStore) : undefined;
  await objectStore?.ensureBucket();
  const runtime = await startRuntime({ ...config, log, cluster: objectStore && nodeId ? { db, nodeId, store: objectStore } : undefined });
  const imageService = new ImageService({
    db,
    engine: runtime.engine,
    imagesDir: join(config.dataDir, "images"),
    rootfs: runtime.rootfs,
    assetsDir: config.assetsDir,
    buildTimeoutMs: config.buildTimeoutSeconds * 1000,
    s3: s3ConfigFromEnv(),
    httpsCa: config.httpsCaFile ? await readFile(config.httpsCaFile, "utf8") : undefined,
    registryCaFile: config.registryCaFile,
    registryPrivateAllow: config.registryPrivateAllow,
    nodeId,
    objects: runtime.imageObjects,
    shared: runtime.sharedSnapshots,
    imageCacheBytes: config.imageCacheGiB * 2 ** 30,
    log,
  });
  await imageService.start();
  const images = new ImageCatalog(runtime.engine, { db, imagesDir: join(config.dataDir, "images"), assetsDir: config.assetsDir, rootfs: runtime.rootfs, assets: runtime.assets, images: imageService, shared: runtime.sharedSnapshots, log });
  const metrics: ServerMetrics = new ServerMetrics({ vmsByState: () => microvms.countByState(), capacity: () => microvms.usage() });
  const capacity = hostCapacity({ vcpu: config.vcpuOvercommit, memory: config.memoryOvercommit }, config.memory);
  // A node's QEMUs must not outlive its lease: the fence finds them by the jail's cgroups.
  const jail = runtime.engine.jailer;
  if (nodeId && !jail) throw new Error("a cluster node (COCOON_DATABASE_URL) needs the QEMU jail (run as root, COCOON_JAIL not off): its lease fence ends its QEMUs through the jail's cgroups");
  const fence = nodeId && jail ? new LeaseFence({ dataDir: config.dataDir, cgroupParent: jail.config.cgroupParent, log }) : undefined;
  // A node holds a lease; it registers before it reconciles its VMs.
  const cluster = nodeId
    ? new ClusterNode(
        db,
        {
          id: nodeId,
          url: config.nodeUrl,
          qemuBuild: qemuBuild(),
          accelerator: runtime.engine.accelerator,
          cpuSignature: cpus()[0]?.model ?? "unknown",
          ...capacity,
        },
        { onFenced: () => microvms.endRunningVms(), builds: () => images.buildsInFlight(), log, guard: fence },
      )
    : undefined;
  await cluster?.start();
  const objects = objectStore ? new SuspendedObjects(objectStore, { blobsDir: join(config.dataDir, "blobs"), accelerator: runtime.engine.accelerator }) : undefined;
  if (objectStore) log(`object store: bucket ${objectStore.bucket} at ${config.objectStore!.url}`);
  const microvms: MicroVmService = new MicroVmService({ db, engine: runtime.engine, images, capacity, observer: metrics, log, cluster, objects });
  await microvms.start();
  // What nothing in the database references any more leaves the bucket (one node at a time).
  const bucketSweep = objectStore && cluster ? new BucketSweep(db, objectStore, { graceSeconds: SWEEP_GRACE_SECONDS, maxKeysPerPass: SWEEP_MAX_KEYS, log }) : undefined;
  bucketSweep?.start(config.bucketSweepMinutes * 60_000);
  const sampler = new VmSampler();
  sampler.start(async () => runtime.engine.list().filter((vm) => vm.status === "running"));
  // Cluster: every node derives the channel's key from the master key they share.
  const nodeChannel = cluster ? new NodeChannel(secrets.derive("cluster-node-channel")) : undefined;
  const api = await buildApi({ db, secrets, microvms, images: imageService, accelerator: runtime.engine.accelerator, jail: runtime.engine.jailer, metrics, sampler, metricsPublic: flags.metricsPublic, logger: true, nodeChannel, execOutputBudgetBytes: config.execOutputBudgetMiB * 2 ** 20 });
  await api.listen({ host: config.listenHost, port: config.listenPort });
  log(`ready: http://${config.listenHost}:${config.listenPort} (accelerator ${runtime.engine.accelerator}, ${runtime.engine.list().length} VMs adopted)`);
  // SIGTERM/SIGINT: stop taking requests, let lifecycle operations under way
  // finish, suspend every running VM to disk, then exit; the next start finds
  // them SUSPENDED and resumes each on its next request. (After SIGKILL, VMs
  // simply keep running and are re-adopted.) Long requests (exec streams,
  // terminals, log follows) are not waited for past a bound.
  const stop = async () => {
    log("shutting down: suspending running VMs");
    microvms.stop();
    sampler.stop();
    await Promise.race([api.close(), new Promise((resolve) => setTimeout(resolve, 10_000))]);
    await microvms.drain(60_000);
    await imageService.close();
    await bucketSweep?.stop();
    await microvms.suspendAll();
    await cluster?.leave();
    await fence?.release();
    await runtime.engine.close();
    await closeDatabase(db);
    process.exit(0);
  };
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
}

/** A node id made at the first start on a cluster and kept in the data directory. */
async function persistentNodeId(dataDir: string): Promise<string> {
  const path = join(dataDir, "node-id");
  const kept = (await readFile(path, "utf8").catch(() => "")).trim();
  if (kept) return kept;
  const id = `node-${randomBytes(4).toString("hex")}`;
  await writeFileAtomic(path, `${id}\n`, 0o600);
  return id;
}

/** An unexpected error with its stack and, when an HTTP request was behind it, the request's id (its log lines carry it). */
function describeFault(reason: unknown): string {
  const requestId = currentRequestId();
  const what = reason instanceof Error ? (reason.stack ?? reason.message) : String(reason);
  return `${requestId ? `request ${requestId}: ` : ""}${what}`;
}
