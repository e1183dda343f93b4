import { randomBytes } from "node:crypto";
import { cpus } from "node:os";
import { mkdir, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import type { Readable } from "node:stream";
import { ApiError, checkIntRange } from "../errors.ts";
import type { Db } from "../store/db.ts";
import { IdempotencyTokens } from "../store/idempotency.ts";
import type { ImageRow, ImageUpdate, MicroVmRow } from "../store/schema.ts";
import { deleteTags, tagResource } from "../store/tags.ts";
import { serialized } from "../store/locks.ts";
import { checkQuota, settingsOf } from "../store/tenants.ts";
import { exists, sha256 } from "../util/files.ts";
import { KeyedMutex } from "../util/keyed-mutex.ts";
import { snapshotDisk, VM_LIMITS, type DiskChain, type Engine, type Snapshot } from "../vmm/engine.ts";
import type { Cidr } from "../vmm/network/addresses.ts";
import { DEFAULT_ARCHIVE_LIMITS, inspectArchive, type ArchiveLimits, type CodeArchive } from "./archive.ts";
import { BuildLog, readBuildLog } from "./build-log.ts";
import { BuildError, buildStage } from "./builder.ts";
import type { VmShape } from "./base-image.ts";
import { describeBase, planDockerfile, type BaseRef, type BuildPlan, type ImageConfig, type Stage } from "./dockerfile.ts";
import { normalizeHooks, type HooksRequest, type ImageHooks } from "./hooks.ts";
import { fetchCode, type S3Config, type StagedCode } from "./intake.ts";
import type { ClusterSnapshots } from "./cluster-snapshots.ts";
import { MANAGED_IMAGES, managedImage, prepareManagedRootfs } from "./managed.ts";
import { RegistryCredentials } from "./registry/credentials.ts";
import { RegistryEgress } from "./registry/egress.ts";
import { DEFAULT_PULL_LIMITS, type PullLimits } from "./registry/layers.ts";
import { PullError, RegistryPuller, type PulledImage } from "./registry/puller.ts";
import { formatReference } from "./registry/reference.ts";
import { prepareScratchDisk, SCRATCH_DISK_GIB } from "./scratch-disk.ts";
import { ImageCache } from "./image-cache.ts";
import type { ImageObjects } from "./image-objects.ts";
import { checkImageTransition, imageStatesBefore, invalidImageState, isBuilding, type ImageState } from "./states.ts";

/** What the lifecycle needs to know of an image. */
export interface ImageRef {
  imageId: string;
  name: string;
  /** The build's version (1, 2, … per name); MANAGED_VERSION for a managed image. */
  version: number;
  /** Lifecycle hooks its VMs get (images/hooks.ts). */
  hooks?: ImageHooks;
  /** Egress connectors its VMs get when the launch names none. */
  egressConnectors?: string[];
  /** Disk size of the image's filesystem: a VM's disk is at least this, and grows to its `diskGiB`. */
  diskGiB: number;
  /** The app's port (Dockerfile EXPOSE), if the image runs an app. */
  appPort?: number;
  /** The image's ENV (Dockerfile images): the base env of every exec and of the app. */
  env?: Record<string, string>;
  /** The shape a Dockerfile image was snapshotted at: the default, and the only one it launches with. */
  shape?: VmShape;
  /** The snapshot for VMs of this shape (built once per shape, then cached; a Dockerfile image refuses another shape with a 400 naming the field). */
  snapshotFor(shape: VmShape): Promise<Snapshot>;
}

export interface ImageServiceOpts {
  db: Db;
  engine: Engine;
  /** Holds `<imageId>/` per build: snapshot/, build.log. */
  imagesDir: string;
  /** The bookworm root filesystem (FROM debian:bookworm[-slim]). */
  rootfs: string;
  /** Where the scratch disk is cached. */
  assetsDir: string;
  /** A build that takes longer fails (default 10 min). */
  buildTimeoutMs?: number;
  /** Longest wait for the app to become ready (default 2 min, and never past the build timeout). */
  readyTimeoutMs?: number;
  /** Without HEALTHCHECK or EXPOSE, the app must stay up this long (default 2 s). */
  settleMs?: number;
  /** Builds running at once (default: half the host's cores, at least 1); more wait for a slot. */
  maxConcurrentBuilds?: number;
  /** Builds waiting for a slot beyond which a create is refused with 429 (default 8). */
  maxQueuedBuilds?: number;
  limits?: ArchiveLimits;
  s3?: S3Config;
  /** Extra CA certificates (PEM) trusted for https:// code URIs, besides the bundled roots (COCOON_HTTPS_CA_FILE). */
  httpsCa?: string;
  /** A PEM file of CA certificates trusted for registries besides the system's (COCOON_REGISTRY_CA_FILE). */
  registryCaFile?: string;
  /** CIDRs of private addresses registries may be pulled from (COCOON_REGISTRY_PRIVATE_ALLOW); none by default. */
  registryPrivateAllow?: Cidr[];
  pullLimits?: PullLimits;
  /** The key registry passwords are sealed with (made on first use; default `<imagesDir>/.credentials.key`). */
  credentialsKeyFile?: string;
  /** Cluster (docs/cluster.md): this server's node; its builds are recorded as its own, and only its own are reconciled at start. */
  nodeId?: string;
  /** Cluster with an object store: READY images are published there, and other nodes' images pulled on first use. */
  objects?: ImageObjects;
  /** With `objects`: the bound of this node's cache of pulled images, in bytes (COCOON_IMAGE_CACHE_GIB; default 20 GiB). */
  imageCacheBytes?: number;
  /** With `objects`: the managed root filesystems a build boots on, made once per cluster. */
  shared?: ClusterSnapshots;
  log?: (line: string) => void;
}

export interface CreateImageRequest {
  name: string;
  /** The Dockerfile text; absent: `Dockerfile` at the archive root. */
  dockerfile?: string;
  code: StagedCode;
  buildArgs?: Record<string, string>;
  /** The Dockerfile stage to build (`FROM … AS name`); default the last. */
  target?: string;
  vcpus?: number;
  memoryMiB?: number;
  /** A managed image (`base`, `python`, `node`) the build starts from: `FROM <it>` when the Dockerfile has none; another FROM is refused. */
  baseImage?: string;
  /** Runtime environment of the image's app and execs, over the Dockerfile's ENV. */
  env?: Record<string, string>;
  hooks?: HooksRequest;
  description?: string;
  /** Default egress connectors of the image's VMs (lifecycle/connectors.ts). */
  egressConnectors?: string[];
  /** Tags of the image (by name). */
  tags?: Record<string, string>;
  /** AWS fields accepted and echoed back but not acted on (api/aws). */
  awsFields?: Record<string, unknown>;
}

/** ACTIVE versions can be launched; INACTIVE ones never are (AWS UpdateMicrovmImageVersion; PATCH /v1/images/{id}). */
export const IMAGE_VERSION_STATUSES = ["ACTIVE", "INACTIVE"] as const;
export type ImageVersionStatus = (typeof IMAGE_VERSION_STATUSES)[number];

const NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const RESERVED = new Set(["scratch", "debian", ...MANAGED_IMAGES.map((m) => m.name)]);

/** An image name a tenant may use (400 naming the field otherwise). */
function checkName(name: string): void {
  if (!NAME.test(name)) throw new ApiError("ValidationError", `name must match ${NAME.source}, got "${name}"`, { field: "name" });
  if (RESERVED.has(name)) throw new ApiError("ValidationError", `name ${name} is reserved for a built-in image`, { field: "name" });
}

/** What a build needs again once it has its slot (the Dockerfile is planned a second time with the pulled configs). */
interface BuildSource {
  dockerfile: string;
  buildArgs?: Record<string, string>;
  target?: string;
  /** The runtime environment given at create, over the target's ENV. */
  env?: Record<string, string>;
  hooks?: ImageHooks;
}

/** The tenant's READY images by name, with their configs: the possible FROM parents. */
type Parents = Map<string, { row: ImageRow; config: ImageConfig }>;

/** The root of a stage's FROM chain (through earlier stages). */
function chainRoot(plan: BuildPlan, stage: number): Exclude<BaseRef, { kind: "stage" }> {
  const base = plan.stages[stage]!.base;
  return base.kind === "stage" ? chainRoot(plan, base.index) : base;
}

/** What a stage's base resolved to when its build starts: its disk with the trusted chain under it. */
interface ResolvedBase {
  disk: DiskChain;
  diskGiB: number;
}

/**
 * MicroVM Images: intake checks, Dockerfile plans, builds in build VMs
 * (bounded), versions per name, READY images for the lifecycle, deletion.
 * Every image state change goes through `transition`.
 */
export class ImageService {
  private readonly db: Db;
  private readonly engine: Engine;
  private readonly opts: ImageServiceOpts;
  private readonly limits: ArchiveLimits;
  private readonly logs = new Map<string, BuildLog>();
  /** Builds holding a build slot, by image id, with the shape of their build VMs (host capacity they take). */
  private readonly active = new Map<string, VmShape>();
  private readonly queue: (() => void)[] = [];
  private readonly builds = new Set<Promise<void>>();
  private readonly controllers = new Map<string, AbortController>();
  private readonly maxConcurrent: number;
  private readonly tokens: IdempotencyTokens;
  /** Per-tenant registry credentials (PUT /v1/registries/{host}). */
  readonly registries: RegistryCredentials;
  private readonly egress: RegistryEgress;
  private readonly puller: RegistryPuller;
  /** Pulled images (cluster with an object store). */
  private readonly cache: ImageCache | undefined;
  /** One pull of an image at a time on this node; launches waiting for it share it. */
  private readonly pulls = new KeyedMutex();

  constructor(opts: ImageServiceOpts) {
    this.opts = opts;
    this.db = opts.db;
    this.engine = opts.engine;
    this.limits = { ...(opts.limits ?? DEFAULT_ARCHIVE_LIMITS) };
    this.maxConcurrent = opts.maxConcurrentBuilds ?? Math.max(1, Math.floor(cpus().length / 2));
    this.tokens = new IdempotencyTokens(opts.db);
    this.registries = new RegistryCredentials(opts.db, opts.credentialsKeyFile ?? join(opts.imagesDir, ".credentials.key"));
    this.egress = new RegistryEgress(opts.registryPrivateAllow);
    this.puller = new RegistryPuller({ assetsDir: opts.assetsDir, egress: this.egress, caFile: opts.registryCaFile, limits: opts.pullLimits ?? DEFAULT_PULL_LIMITS });
    this.cache = opts.objects
      ? new ImageCache({
          imagesDir: opts.imagesDir,
          boundBytes: opts.imageCacheBytes ?? 20 * 2 ** 30,
          snapshotDirsInUse: () => new Set(this.engine.list().map((vm) => vm.record.snapshotDir)),
          exists: async (id) => (await this.db.selectFrom("images").select("id").where("id", "=", id).executeTakeFirst()) !== undefined,
          release: (dir) => this.engine.dropWarm(dir),
          log: opts.log,
        })
      : undefined;
  }

  get stagingDir(): string {
    return join(this.opts.imagesDir, ".staging");
  }

  get archiveLimits(): ArchiveLimits {
    return this.limits;
  }

  /**
   * Fetches a tenant's code URI into the staging directory, within the
   * archive limit, the tenant's `s3Allow` and the server's SSRF rules
   * (`fetchCode`). Both front doors take code URIs only through here.
   */
  async fetchCode(tenantId: string, codeUri: string, opts: { admin: boolean }): Promise<StagedCode> {
    const { s3Allow } = await settingsOf(this.db, tenantId);
    return fetchCode(codeUri, { stagingDir: this.stagingDir, maxBytes: this.limits.maxCompressedBytes, admin: opts.admin, s3: this.opts.s3 ?? {}, s3Allow, httpsCa: this.opts.httpsCa });
  }

  /**
   * After a restart: a build cut short is FAILED; nothing half-built stays.
   * Its build VMs were templates, which the engine ended when it opened.
   */
  async start(): Promise<void> {
    await rm(this.stagingDir, { recursive: true, force: true });
    await this.puller.removeStale();
    const rows = await this.db
      .selectFrom("images")
      .selectAll()
      .where("state", "in", ["PENDING", "BUILDING", "DELETING"])
      .$if(this.opts.nodeId !== undefined, (qb) => qb.where("node_id", "=", this.opts.nodeId!))
      .execute();
    for (const row of rows) {
      const dir = this.dirOf(row.id);
      await rm(join(dir, "snapshot"), { recursive: true, force: true });
      await rm(join(dir, "stages"), { recursive: true, force: true });
      await rm(join(dir, "code.zip"), { force: true });
      if (row.state === "DELETING") await this.removeRow(row);
      else await this.transition(row, "FAILED", { state_reason: "the server restarted during the build" });
    }
    if (this.opts.objects) {
      // Images this node made whose publication was cut short (or made before the cluster had a store).
      const unpublished = await this.db.selectFrom("images").selectAll().where("state", "=", "READY").where("node_id", "=", this.opts.nodeId!).where("snapshot_object", "is", null).execute();
      for (const row of unpublished) this.publish(row);
      await this.cache!.evict();
    }
  }

  /** Lets running builds finish their cleanup (tests, shutdown): aborts them and waits. */
  async close(): Promise<void> {
    for (const c of this.controllers.values()) c.abort(new BuildError("the server is shutting down"));
    await Promise.allSettled([...this.builds]);
    await this.egress.close();
  }

  /**
   * Checks the archive and the Dockerfile (400 naming the entry or the line),
   * records a new version of the image as BUILDING and queues its build.
   * The staged code file is consumed (moved or removed) in every case.
   */
  async create(tenantId: string, req: CreateImageRequest): Promise<ImageRow> {
    try {
      checkName(req.name);
      const vcpus = req.vcpus ?? 1;
      const memoryMiB = req.memoryMiB ?? 512;
      checkIntRange("vcpus", vcpus, VM_LIMITS.vcpus);
      checkIntRange("memoryMiB", memoryMiB, VM_LIMITS.memoryMiB);
      if (this.queue.length >= (this.opts.maxQueuedBuilds ?? 8)) {
        throw new ApiError("RateLimited", `${this.queue.length} builds are already waiting for a build slot; retry later`);
      }
      const hooks = req.hooks ? normalizeHooks(req.hooks) : undefined;
      const archive = await inspectArchive(req.code.path, req.code.sizeBytes, this.limits);
      let dockerfile = req.dockerfile ?? archive.dockerfile;
      if (dockerfile === undefined) throw new ApiError("ValidationError", "no dockerfile given and no Dockerfile at the root of the code archive", { field: "dockerfile" });
      if (req.baseImage !== undefined && !/^\s*FROM\s/im.test(dockerfile)) dockerfile = `FROM ${req.baseImage}\n${dockerfile}`;
      const parents = await this.readyByName(tenantId);
      const plan = withRuntimeEnv(planDockerfile(dockerfile, { buildArgs: req.buildArgs, target: req.target, parentConfig: (n) => parents.get(n)?.config }), req.env);
      if (req.baseImage !== undefined) checkManagedBase(plan, req.baseImage);
      // A registry at an address the server may not reach is refused now, not at the build.
      for (const { base, line } of plan.order.map((n) => plan.stages[n]!)) {
        const refused = base.kind === "registry" ? this.egress.checkHost(base.ref.registry) : undefined;
        if (refused && base.kind === "registry") {
          throw new ApiError("ValidationError", `Dockerfile line ${line}: FROM ${formatReference(base.ref)}: ${refused}`, { field: "dockerfile", line });
        }
      }
      // The image's disk is layered on the root of the target's FROM chain: a tenant image there must outlive this one.
      const root = chainRoot(plan, plan.target);
      const parent = root.kind === "image" ? parents.get(root.name)!.row : undefined;
      // Per tenant: the quota count and the insert are one step.
      let hasSlot = false;
      const row = await serialized(this.db, `image-versions:${tenantId}`, async () => {
        const held = await this.db.selectFrom("images").select((eb) => eb.fn.countAll<number>().as("n")).where("tenant_id", "=", tenantId).executeTakeFirst();
        await checkQuota(this.db, tenantId, "images", Number(held?.n ?? 0), "image versions");
        const last = await this.db
          .selectFrom("images")
          .select((eb) => eb.fn.max<number>("version").as("v"))
          .where("tenant_id", "=", tenantId)
          .where("name", "=", req.name)
          .executeTakeFirst();
        const id = `img-${randomBytes(8).toString("hex")}`;
        // A free build slot is taken with the check, synchronously: the row says BUILDING only
        // when its build starts now, PENDING while it waits for a slot.
        hasSlot = this.active.size < this.maxConcurrent;
        if (hasSlot) this.active.set(id, { vcpus, memoryMiB });
        const newRow: ImageRow = {
          id,
          tenant_id: tenantId,
          name: req.name,
          version: (last?.v ?? 0) + 1,
          state: hasSlot ? "BUILDING" : "PENDING",
          state_reason: null,
          created_at: new Date().toISOString(),
          ready_at: null,
          size_bytes: 0,
          disk_bytes: 0,
          memory_bytes: 0,
          app_port: plan.config.appPort ?? null,
          vcpus,
          memory_mib: memoryMiB,
          // A registry image's disk size is known once it is pulled (updated when READY).
          disk_gib: parent?.disk_gib ?? (root.kind === "managed" ? managedImage(root.name)!.recipe.diskGiB : SCRATCH_DISK_GIB),
          dockerfile_digest: `sha256:${sha256(dockerfile)}`,
          code_digest: `sha256:${req.code.sha256}`,
          code_source: req.code.source,
          parent_image_id: parent?.id ?? null,
          source_microvm_id: null,
          config: JSON.stringify(plan.config),
          build_ms: null,
          status: "ACTIVE",
          hooks: hooks ? JSON.stringify(hooks) : null,
          description: req.description ?? null,
          base_image: req.baseImage ?? null,
          egress_connectors: req.egressConnectors ? JSON.stringify(req.egressConnectors) : null,
          aws_fields: req.awsFields ? JSON.stringify(req.awsFields) : null,
          node_id: this.opts.nodeId ?? null,
          snapshot_object: null,
          snapshot_manifest: null,
        };
        try {
          if (req.tags) await tagResource(this.db, tenantId, { type: "microvm-image", id: req.name }, req.tags);
          await mkdir(this.dirOf(id), { recursive: true });
          await rename(req.code.path, join(this.dirOf(id), "code.zip"));
          await this.db.insertInto("images").values(newRow).execute();
        } catch (err) {
          if (hasSlot) this.releaseSlot(id);
          throw err;
        }
        return newRow;
      });
      this.startBuild(row, hasSlot, { dockerfile, buildArgs: req.buildArgs, target: req.target, env: req.env, hooks }, plan, archive, parents);
      return row;
    } finally {
      await rm(req.code.path, { force: true });
    }
  }

  /**
   * `create` once per client token (AWS clientToken, `/v1` clientToken): a
   * retry with the same token and `request` gets the image version the first
   * call made, without fetching its code again (`prepare` is not called); the
   * same token with another request is a Conflict.
   */
  async createOnce(tenantId: string, token: { operation: string; clientToken: string }, request: unknown, prepare: () => Promise<CreateImageRequest>): Promise<ImageRow> {
    const { resourceId } = await this.tokens.run({ tenantId, operation: token.operation, token: token.clientToken }, request, async () => (await this.create(tenantId, await prepare())).id);
    return this.get(tenantId, resourceId);
  }

  /**
   * A snapshot of a running microVM as a new version of image `name`: the
   * tenant's quota checked and the row inserted BUILDING in one step, then
   * `capture` writes the snapshot into the version's directory (the VM
   * keeps running) and the version is READY. It keeps the VM's shape, disk
   * size, app port and its image's configuration; its disk is layered on its
   * image's, which is its parent (so cannot be deleted before it).
   */
  async createSnapshot(
    tenantId: string,
    req: { name: string; vm: MicroVmRow },
    capture: (snapshotDir: string) => Promise<{ pauseMs: number }>,
  ): Promise<{ row: ImageRow; pauseMs: number }> {
    const { name, vm } = req;
    checkName(name);
    const source = await this.db.selectFrom("images").selectAll().where("tenant_id", "=", tenantId).where("id", "=", vm.image_id).executeTakeFirst();
    const row = await serialized(this.db, `image-versions:${tenantId}`, async () => {
      const held = await this.db.selectFrom("images").select((eb) => eb.fn.countAll<number>().as("n")).where("tenant_id", "=", tenantId).executeTakeFirst();
      await checkQuota(this.db, tenantId, "images", Number(held?.n ?? 0), "image versions");
      const last = await this.db.selectFrom("images").select((eb) => eb.fn.max<number>("version").as("v")).where("tenant_id", "=", tenantId).where("name", "=", name).executeTakeFirst();
      const newRow: ImageRow = {
        id: `img-${randomBytes(8).toString("hex")}`,
        tenant_id: tenantId,
        name,
        version: (last?.v ?? 0) + 1,
        state: "BUILDING",
        state_reason: null,
        created_at: new Date().toISOString(),
        ready_at: null,
        size_bytes: 0,
        disk_bytes: 0,
        memory_bytes: 0,
        app_port: vm.app_port,
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_gib: vm.disk_gib,
        dockerfile_digest: source?.dockerfile_digest ?? "",
        code_digest: source?.code_digest ?? "",
        code_source: `microvm:${vm.id}`,
        parent_image_id: source?.id ?? null,
        source_microvm_id: vm.id,
        config: source?.config ?? "{}",
        build_ms: null,
        status: "ACTIVE",
        hooks: vm.hooks,
        description: `snapshot of microVM ${vm.id}`,
        base_image: source?.base_image ?? (source ? null : vm.image_name),
        egress_connectors: vm.egress_connectors,
        aws_fields: null,
        // Its files are on this node, like a build's.
        node_id: this.opts.nodeId ?? null,
        snapshot_object: null,
        snapshot_manifest: null,
      };
      await mkdir(this.dirOf(newRow.id), { recursive: true });
      await this.db.insertInto("images").values(newRow).execute();
      return newRow;
    });
    const started = Date.now();
    const snap = join(this.dirOf(row.id), "snapshot");
    try {
      const { pauseMs } = await capture(snap);
      const diskBytes = await allocated(join(snap, "disk.qcow2"));
      const memoryBytes = await allocated(join(snap, "state"));
      const update = { ready_at: new Date().toISOString(), disk_bytes: diskBytes, memory_bytes: memoryBytes, size_bytes: diskBytes + memoryBytes, build_ms: Date.now() - started };
      await this.transition(row, "READY", update);
      this.publish(row);
      return { row: { ...row, ...update, state: "READY" }, pauseMs };
    } catch (err) {
      await rm(snap, { recursive: true, force: true });
      await this.transition(row, "FAILED", { state_reason: `the snapshot failed: ${(err as Error).message}`, build_ms: Date.now() - started }).catch(
        (e: Error) => this.opts.log?.(`image ${row.id}: recording the failure: ${e.message}`),
      );
      throw err;
    }
  }

  async list(tenantId: string, filter: { name?: string } = {}): Promise<ImageRow[]> {
    let q = this.db.selectFrom("images").selectAll().where("tenant_id", "=", tenantId);
    if (filter.name) q = q.where("name", "=", filter.name);
    return q.orderBy("name").orderBy("version").execute();
  }

  /** By id, or by name (its latest version); another tenant's image is NotFound. */
  async get(tenantId: string, idOrName: string): Promise<ImageRow> {
    const row = await this.db
      .selectFrom("images")
      .selectAll()
      .where("tenant_id", "=", tenantId)
      .where((eb) => eb.or([eb("id", "=", idOrName), eb("name", "=", idOrName)]))
      .orderBy("version", "desc")
      .executeTakeFirst();
    if (!row) throw new ApiError("NotFound", `image ${idOrName} not found`);
    return row;
  }

  /** The build log; with `follow`, streamed until the build ends. */
  async buildLog(tenantId: string, idOrName: string, follow: boolean): Promise<Readable> {
    const row = await this.get(tenantId, idOrName);
    const live = this.logs.get(row.id);
    return live ? live.stream(follow) : readBuildLog(join(this.dirOf(row.id), "build.log"));
  }

  /**
   * The latest READY version of a name (or that exact id), for launching.
   * NotFound if there is none; InvalidState if the only versions are building or failed.
   */
  async resolve(tenantId: string, nameOrId: string, version?: number): Promise<ImageRef> {
    let q = this.db
      .selectFrom("images")
      .selectAll()
      .where("tenant_id", "=", tenantId)
      .where((eb) => eb.or([eb("id", "=", nameOrId), eb("name", "=", nameOrId)]));
    if (version !== undefined) q = q.where("version", "=", version);
    const rows = await q.orderBy("version", "desc").execute();
    const what = version !== undefined ? `image ${nameOrId} version ${version}` : `image ${nameOrId}`;
    // By name the latest READY, ACTIVE version; an explicit version or id must itself be READY and ACTIVE.
    const exact = version !== undefined || rows[0]?.id === nameOrId;
    const row = rows.find((r) => r.state === "READY" && r.status === "ACTIVE");
    if (!row || (exact && row !== rows[0])) {
      if (!rows.length) throw new ApiError("NotFound", `${what} not found`, { field: "image" });
      const inactive = rows.find((r) => r.state === "READY" && r.status !== "ACTIVE");
      if (inactive && (exact || !rows.some((r) => r.state === "READY" && r.status === "ACTIVE"))) {
        throw new ApiError("InvalidState", `${exact ? what : `every READY version of image ${nameOrId}`} is INACTIVE: activate it to launch`, { field: "image", status: "INACTIVE" });
      }
      throw new ApiError("InvalidState", `${what} has no READY build (latest is ${rows[0]!.state})`, { field: "image", state: rows[0]!.state });
    }
    const config = JSON.parse(row.config) as ImageConfig;
    return {
      imageId: row.id,
      name: row.name,
      version: row.version,
      hooks: row.hooks ? (JSON.parse(row.hooks) as ImageHooks) : undefined,
      egressConnectors: row.egress_connectors ? (JSON.parse(row.egress_connectors) as string[]) : undefined,
      diskGiB: row.disk_gib,
      appPort: row.app_port ?? undefined,
      env: config.env,
      shape: { vcpus: row.vcpus, memoryMiB: row.memory_mib },
      snapshotFor: async (shape: VmShape): Promise<Snapshot> => {
        // One snapshot per image: its memory size and vCPUs are those of the build.
        for (const [field, want, have] of [["vcpus", shape.vcpus, row.vcpus], ["memoryMiB", shape.memoryMiB, row.memory_mib]] as const) {
          if (want !== have) {
            throw new ApiError("ValidationError", `${field} must be ${have} for image ${row.name}: it was snapshotted with ${row.vcpus} vCPU and ${row.memory_mib} MiB`, {
              field,
              image: row.id,
            });
          }
        }
        return this.localSnapshot(row);
      },
    };
  }

  /**
   * The image's snapshot on this node: its own build's, or, for an image
   * another node built, the copy pulled from the object store on its first
   * use here (then cached, LRU; `ImageCache`). Concurrent launches share
   * one pull.
   */
  private async localSnapshot(row: ImageRow): Promise<Snapshot> {
    const dir = join(this.dirOf(row.id), "snapshot");
    const cache = this.cache;
    if (!cache || !this.opts.objects || row.node_id === null || row.node_id === this.opts.nodeId) return this.engine.loadSnapshot(dir);
    return this.pulls.run(row.id, async () => {
      if ((await cache.touch(row.id)) && (await exists(join(dir, "manifest.json")))) return this.engine.loadSnapshot(dir);
      if (!row.snapshot_object) {
        throw new ApiError("MisdirectedRequest", `image ${row.name} version ${row.version} is on node ${row.node_id} and not in the object store yet`, { node: row.node_id });
      }
      await mkdir(this.dirOf(row.id), { recursive: true });
      await cache.markPulled(row.id);
      const started = performance.now();
      await this.opts.objects!.pull({ id: row.id, vcpus: row.vcpus, memoryMiB: row.memory_mib, diskGiB: row.disk_gib, object: row.snapshot_object, manifest: row.snapshot_manifest }, dir);
      this.opts.log?.(`image ${row.id} pulled from the object store in ${((performance.now() - started) / 1000).toFixed(1)} s`);
      await cache.evict().catch((err: Error) => this.opts.log?.(`image cache: ${err.message}`));
      return this.engine.loadSnapshot(dir);
    });
  }

  /**
   * Publishes a READY image this node made to the object store, after the
   * fact (its launches here do not wait), and records where in its row,
   * conditional on it being still READY; a failure is logged (its VMs then
   * launch only here) and tried again at the next start.
   */
  private publish(row: ImageRow): void {
    const objects = this.opts.objects;
    if (!objects) return;
    const job = (async () => {
      const snapshot = await this.engine.loadSnapshot(join(this.dirOf(row.id), "snapshot"));
      const started = performance.now();
      const { prefix, manifestSha256, bytes } = await objects.publish(row.id, snapshot);
      const done = await this.db.updateTable("images").set({ snapshot_object: prefix, snapshot_manifest: manifestSha256 }).where("id", "=", row.id).where("state", "=", "READY").executeTakeFirst();
      if (done.numUpdatedRows === 0n) await objects.remove(prefix);
      else this.opts.log?.(`image ${row.id} published to the object store (${mib(bytes)} MiB in ${((performance.now() - started) / 1000).toFixed(1)} s)`);
    })().catch((err: Error) => this.opts.log?.(`publishing image ${row.id}: ${err.message}`));
    this.builds.add(job);
    void job.finally(() => this.builds.delete(job));
  }

  /** One version of a name; NotFound naming both. */
  async getVersion(tenantId: string, nameOrId: string, version: number): Promise<ImageRow> {
    const name = (await this.get(tenantId, nameOrId)).name;
    const row = await this.db.selectFrom("images").selectAll().where("tenant_id", "=", tenantId).where("name", "=", name).where("version", "=", version).executeTakeFirst();
    if (!row) throw new ApiError("NotFound", `image ${name} has no version ${version}`);
    return row;
  }

  /** Marks one version ACTIVE or INACTIVE (an INACTIVE one is never launched; VMs already running keep running). */
  async setStatus(tenantId: string, imageId: string, status: ImageVersionStatus): Promise<ImageRow> {
    if (!IMAGE_VERSION_STATUSES.includes(status)) throw new ApiError("ValidationError", `status must be ACTIVE or INACTIVE, got ${String(status)}`, { field: "status" });
    const row = await this.get(tenantId, imageId);
    await this.db.updateTable("images").set({ status }).where("id", "=", row.id).execute();
    return { ...row, status };
  }

  /**
   * The image versions a delete of `idOrName` removes: one version (by id)
   * or every version (by name). 409 while one is building, or while another
   * image is built on it (its disk backs theirs). Which microVMs use them is
   * the lifecycle's to check (`MicroVmService.deleteImage`); nothing changes here.
   */
  async versionsToDelete(tenantId: string, idOrName: string): Promise<ImageRow[]> {
    if (managedImage(idOrName)) throw new ApiError("Conflict", `image ${idOrName} is managed by Cocoon and cannot be deleted`, { image: idOrName });
    const one = await this.get(tenantId, idOrName);
    const rows = one.id === idOrName ? [one] : await this.list(tenantId, { name: one.name });
    const ids = rows.map((r) => r.id);
    for (const r of rows) if (isBuilding(r.state as ImageState)) checkImageTransition(r.id, r.state as ImageState, "DELETING", "delete");
    const children = await this.db.selectFrom("images").select(["id", "name"]).where("parent_image_id", "in", ids).where("id", "not in", ids).execute();
    if (children.length) {
      throw new ApiError("Conflict", `image ${idOrName} is the base of ${children.map((c) => `${c.name} (${c.id})`).join(", ")}: delete those first`, {
        images: children.map((c) => c.id),
      });
    }
    return rows;
  }

  /** Marks the versions DELETING: none is launched from now on. */
  async beginDelete(rows: ImageRow[]): Promise<void> {
    for (const r of rows) await this.transition(r, "DELETING");
  }

  /** Removes the versions (files, rows) once nothing uses them, and the name's tags with its last version. */
  async finishDelete(tenantId: string, rows: ImageRow[]): Promise<void> {
    for (const r of rows) await this.removeRow(r);
    const name = rows[0]?.name;
    const left = name && (await this.db.selectFrom("images").select("id").where("tenant_id", "=", tenantId).where("name", "=", name).executeTakeFirst());
    if (name && !left) await deleteTags(this.db, tenantId, { type: "microvm-image", id: name });
  }

  // ---- builds ------------------------------------------------------------------

  /** Runs a build: at once if `hasSlot` (taken at create), else once a slot is handed over (PENDING → BUILDING). */
  private startBuild(row: ImageRow, hasSlot: boolean, source: BuildSource, createPlan: BuildPlan, archive: CodeArchive, parents: Parents): void {
    const dir = this.dirOf(row.id);
    const log = new BuildLog(join(dir, "build.log"));
    this.logs.set(row.id, log);
    const controller = new AbortController();
    this.controllers.set(row.id, controller);
    const build = (async () => {
      const started = Date.now();
      try {
        log.line(`==> image ${row.name} version ${row.version} (${row.id}); Dockerfile ${row.dockerfile_digest}, code ${row.code_digest}`);
        if (!hasSlot) {
          log.line(`==> waiting for a build slot (${this.active.size} builds running)`);
          await new Promise<void>((resolve, reject) => {
            // Taken synchronously when the slot is handed over: no other build can take it meanwhile.
            const take = () => {
              this.active.set(row.id, { vcpus: row.vcpus, memoryMiB: row.memory_mib });
              controller.signal.removeEventListener("abort", cancel);
              resolve();
            };
            const cancel = () => {
              this.queue.splice(this.queue.indexOf(take), 1);
              reject(controller.signal.reason as Error);
            };
            this.queue.push(take);
            controller.signal.addEventListener("abort", cancel, { once: true });
          });
        }
        const timeoutMs = this.opts.buildTimeoutMs ?? 600_000;
        const timer = setTimeout(() => controller.abort(new BuildError(`the build timed out after ${Math.round(timeoutMs / 1000)} s`)), timeoutMs);
        let built: { plan: BuildPlan; diskGiB: number };
        try {
          if (!hasSlot) await this.transition(row, "BUILDING");
          built = await this.buildStages(row, source, createPlan, archive, parents, log, controller.signal, timeoutMs);
        } finally {
          clearTimeout(timer);
          this.releaseSlot(row.id);
        }
        const snap = join(dir, "snapshot");
        const diskBytes = await allocated(join(snap, "disk.qcow2"));
        const memoryBytes = await allocated(join(snap, "memory"));
        const buildMs = Date.now() - started;
        log.line(`==> READY in ${(buildMs / 1000).toFixed(1)} s: disk ${mib(diskBytes)} MiB, memory ${mib(memoryBytes)} MiB`);
        await this.transition(row, "READY", {
          ready_at: new Date().toISOString(),
          disk_bytes: diskBytes,
          memory_bytes: memoryBytes,
          size_bytes: diskBytes + memoryBytes,
          build_ms: buildMs,
          // With a registry base, the config and the disk size are known only now.
          config: JSON.stringify(built.plan.config),
          app_port: built.plan.config.appPort ?? null,
          disk_gib: built.diskGiB,
        });
        this.publish(row);
      } catch (err) {
        const reason = controller.signal.aborted && controller.signal.reason instanceof Error ? controller.signal.reason.message : (err as Error).message;
        const userFacing = err instanceof BuildError || err instanceof PullError || (err instanceof ApiError && err.code === "ValidationError") || controller.signal.aborted;
        log.line(`==> FAILED: ${userFacing ? reason : `internal error: ${reason}`}`);
        if (!userFacing) this.opts.log?.(`image ${row.id} build failed: ${(err as Error).stack ?? reason}`);
        // Nothing half-published: the snapshot and stage directories go, the log stays.
        await rm(join(dir, "snapshot"), { recursive: true, force: true });
        await rm(join(dir, "stages"), { recursive: true, force: true });
        await this.transition(row, "FAILED", { state_reason: userFacing ? reason : "internal error during the build; see the build log", build_ms: Date.now() - started }).catch(
          (e: Error) => this.opts.log?.(`image ${row.id}: recording the failure: ${e.message}`),
        );
      } finally {
        await rm(join(dir, "code.zip"), { force: true });
        this.controllers.delete(row.id);
        await log.end();
        this.logs.delete(row.id);
      }
    })();
    this.builds.add(build);
    void build.finally(() => this.builds.delete(build));
  }

  /**
   * Pulls the registry images the stages need (with the tenant's own
   * credentials), plans the Dockerfile again with their configs, and builds
   * the stages in order, each in a build VM of the image's shape: a stage
   * another is FROM keeps its disk (under `stages/`, the image's disk is
   * layered on it), a stage only copied from hands over a tar of what is
   * copied, the target is snapshotted. Returns the final plan and the disk size.
   */
  private async buildStages(
    row: ImageRow,
    source: BuildSource,
    createPlan: BuildPlan,
    archive: CodeArchive,
    parents: Parents,
    log: BuildLog,
    signal: AbortSignal,
    timeoutMs: number,
  ): Promise<{ plan: BuildPlan; diskGiB: number }> {
    const dir = this.dirOf(row.id);
    const refs = createPlan.order.map((n) => createPlan.stages[n]!.base).filter((b): b is Extract<BaseRef, { kind: "registry" }> => b.kind === "registry");
    const pulled = new Map<string, PulledImage>();
    if (refs.length) {
      const auth = await this.registries.authFile(row.tenant_id, [...new Set(refs.map((b) => b.ref.registry))]);
      for (const { ref } of refs) {
        const key = formatReference(ref);
        if (!pulled.has(key)) pulled.set(key, await this.puller.pull({ ref, auth, log: (l) => log.line(l), signal }));
      }
    }
    const plan = pulled.size
      ? withRuntimeEnv(
          planDockerfile(source.dockerfile, {
            buildArgs: source.buildArgs,
            target: source.target,
            parentConfig: (n) => parents.get(n)?.config,
            registryConfig: (ref) => pulled.get(formatReference(ref))?.config,
          }),
          source.env,
        )
      : createPlan;
    await mkdir(join(dir, "stages"), { recursive: true });
    /** Disks of the stages built so far that later stages are FROM. */
    const stageDisks = new Map<number, ResolvedBase>();
    const imports = new Map<number, string>();
    let targetBase: ResolvedBase | undefined;
    for (const n of plan.order) {
      signal.throwIfAborted();
      const stage = plan.stages[n]!;
      const target = n === plan.target;
      const base = await this.resolveBase(stage, plan, parents, pulled, stageDisks, log);
      if (target) targetBase = base;
      const keep = target || plan.order.some((m) => plan.stages[m]!.base.kind === "stage" && (plan.stages[m]!.base as { index: number }).index === n);
      const vmDir = target ? join(dir, "snapshot") : join(dir, "stages", String(n));
      const exportTo = stage.exports.length ? join(dir, "stages", `${n}.tar`) : undefined;
      await buildStage(this.engine, {
        plan,
        stage: n,
        zipPath: join(dir, "code.zip"),
        archive,
        base: base.disk,
        dir: vmDir,
        vcpus: row.vcpus,
        memoryMiB: row.memory_mib,
        log,
        signal,
        readyTimeoutMs: Math.min(this.opts.readyTimeoutMs ?? 120_000, timeoutMs),
        settleMs: this.opts.settleMs ?? 2000,
        imports,
        exportTo,
        keep,
        hooks: target ? source.hooks : undefined,
      });
      if (exportTo) imports.set(n, exportTo);
      if (target) continue;
      if (keep) {
        // Only the disk is built on; the stage's memory is not needed again.
        for (const f of ["memory", "state", "manifest.json"]) await rm(join(vmDir, f), { force: true });
        stageDisks.set(n, { disk: { path: join(vmDir, "disk.qcow2"), backing: [base.disk.path, ...base.disk.backing] }, diskGiB: base.diskGiB });
      } else {
        await rm(vmDir, { recursive: true, force: true });
      }
    }
    for (const tar of imports.values()) await rm(tar, { force: true });
    return { plan, diskGiB: targetBase!.diskGiB };
  }

  /** The disk a stage boots on: a managed root filesystem (built on first use), scratch, one of the tenant's images, a pulled image, or an earlier stage's. */
  private async resolveBase(stage: Stage, plan: BuildPlan, parents: Parents, pulled: Map<string, PulledImage>, stageDisks: Map<number, ResolvedBase>, log: BuildLog): Promise<ResolvedBase> {
    const base = stage.base;
    switch (base.kind) {
      case "managed": {
        const recipe = managedImage(base.name)!.recipe;
        const disk = base.name === "base" ? this.opts.rootfs : await prepareManagedRootfs(this.opts.assetsDir, base.name, (l) => log.line(`==> ${l}`), this.opts.shared);
        return { disk: { path: disk, backing: [] }, diskGiB: recipe.diskGiB };
      }
      case "scratch":
        return { disk: { path: await prepareScratchDisk(this.opts.assetsDir, this.opts.log), backing: [] }, diskGiB: SCRATCH_DISK_GIB };
      case "image": {
        const parent = parents.get(base.name);
        if (!parent) throw new BuildError(`FROM ${base.name}: the image is no longer READY`);
        // Its snapshot's disk, with the chain its manifest names (never a disk header's); pulled if another node built it.
        return { disk: snapshotDisk(await this.localSnapshot(parent.row)), diskGiB: parent.row.disk_gib };
      }
      case "registry": {
        const image = pulled.get(formatReference(base.ref))!;
        return { disk: { path: image.disk, backing: [] }, diskGiB: image.diskGiB };
      }
      case "stage": {
        const built = stageDisks.get(base.index);
        if (!built) throw new Error(`stage ${describeBase(base, plan.stages)} was not built before stage ${stage.index}`);
        return built;
      }
      default: {
        const never: never = base;
        throw new Error(`unknown base ${String(never)}`);
      }
    }
  }

  /** Gives a build slot back, to the first build waiting for one. */
  private releaseSlot(imageId: string): void {
    this.active.delete(imageId);
    this.queue.shift()?.();
  }

  /** Host capacity the builds holding a slot take (their build VMs' shapes): admission counts it (lifecycle). */
  buildsInFlight(): VmShape {
    const total = { vcpus: 0, memoryMiB: 0 };
    for (const shape of this.active.values()) {
      total.vcpus += shape.vcpus;
      total.memoryMiB += shape.memoryMiB;
    }
    return total;
  }

  /** READY images of a tenant by name (latest version), with their configs: the possible FROM parents. */
  private async readyByName(tenantId: string): Promise<Parents> {
    const rows = await this.db.selectFrom("images").selectAll().where("tenant_id", "=", tenantId).where("state", "=", "READY").orderBy("version").execute();
    return new Map(rows.map((r) => [r.name, { row: r, config: JSON.parse(r.config) as ImageConfig }]));
  }

  private dirOf(id: string): string {
    return join(this.opts.imagesDir, id);
  }

  private async removeRow(row: ImageRow): Promise<void> {
    const snap = join(this.dirOf(row.id), "snapshot");
    await this.engine.dropWarm(snap);
    await rm(this.dirOf(row.id), { recursive: true, force: true });
    const published = await this.db.selectFrom("images").select("snapshot_object").where("id", "=", row.id).executeTakeFirst();
    await this.db.deleteFrom("images").where("id", "=", row.id).execute();
    // Copies pulled by other nodes go at their next pull (ImageCache.evict).
    if (published?.snapshot_object) await this.opts.objects?.remove(published.snapshot_object).catch((err: Error) => this.opts.log?.(`removing ${published.snapshot_object}: ${err.message}`));
  }

  /** The only writer of images.state. */
  private async transition(row: ImageRow, to: ImageState, update: ImageUpdate = {}): Promise<void> {
    // Conditional on the current state being one `to` may follow: an illegal transition changes nothing.
    const done = await this.db.updateTable("images").set({ ...update, state: to }).where("id", "=", row.id).where("state", "in", imageStatesBefore(to)).executeTakeFirst();
    if (done.numUpdatedRows === 0n) {
      const current = await this.db.selectFrom("images").select("state").where("id", "=", row.id).executeTakeFirstOrThrow();
      throw invalidImageState(row.id, current.state, to.toLowerCase());
    }
  }
}

async function allocated(path: string): Promise<number> {
  const st = await stat(path);
  return st.blocks * 512;
}

const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(1);

/** The create request's runtime environment over the target's ENV (the image's config). */
function withRuntimeEnv(plan: BuildPlan, env: Record<string, string> | undefined): BuildPlan {
  if (!env) return plan;
  const target = plan.stages[plan.target]!;
  target.config = { ...target.config, env: { ...target.config.env, ...env } };
  return { ...plan, config: target.config };
}

/** A build on a managed base must keep that base: the root of the target's FROM chain has to be that managed image. */
function checkManagedBase(plan: BuildPlan, baseImage: string): void {
  const root = chainRoot(plan, plan.target);
  if (root.kind !== "managed" || root.name !== baseImage) {
    const line = plan.stages[plan.target]!.line;
    throw new ApiError("ValidationError", `the Dockerfile's FROM (line ${line}) names another base than the managed image ${baseImage}; remove the FROM line or make it FROM ${baseImage}`, {
      field: "dockerfile",
    });
  }
}
