import { randomBytes } from "node:crypto";
import { cpus } from "node:os";
import { mkdir, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Readable } from "node:stream";
import { ApiError, checkIntRange } from "../errors.ts";
import type { Db } from "../store/db.ts";
import { IdempotencyTokens } from "../store/idempotency.ts";
import type { ImageRow, ImageUpdate } from "../store/schema.ts";
import { deleteTags, tagResource } from "../store/tags.ts";
import { sha256 } from "../util/files.ts";
import { KeyedMutex } from "../util/keyed-mutex.ts";
import { Engine, VM_LIMITS, type Snapshot } from "../vmm/engine.ts";
import { DEFAULT_ARCHIVE_LIMITS, inspectArchive, type ArchiveLimits, type CodeArchive } from "./archive.ts";
import { BASE_ROOTFS_RECIPE } from "./base-rootfs.ts";
import { BuildLog, readBuildLog } from "./build-log.ts";
import { BuildError, buildInVm } from "./builder.ts";
import type { VmShape } from "./base-image.ts";
import type { ImageRef } from "./catalog.ts";
import { planDockerfile, type BuildPlan, type ImageConfig } from "./dockerfile.ts";
import { normalizeHooks, type HooksRequest, type ImageHooks } from "./hooks.ts";
import type { S3Config, StagedCode } from "./intake.ts";
import { prepareScratchDisk } from "./scratch-disk.ts";
import { checkImageTransition, isBuilding, type ImageState } from "./states.ts";

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
  /** Ends a microVM (DELETE ?force=true of an image it uses). */
  terminateVm: (tenantId: string, vmId: string, cause: string) => Promise<unknown>;
  log?: (line: string) => void;
}

export interface CreateImageRequest {
  name: string;
  /** The Dockerfile text; absent: `Dockerfile` at the archive root. */
  dockerfile?: string;
  code: StagedCode;
  buildArgs?: Record<string, string>;
  vcpus?: number;
  memoryMiB?: number;
  /** A managed image (`base`) the build starts from: `FROM <it>` when the Dockerfile has none; another FROM is refused. */
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
const RESERVED = new Set(["base", "scratch", "debian"]);

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
  private readonly names = new KeyedMutex();
  private running = 0;
  private readonly queue: (() => void)[] = [];
  private readonly builds = new Set<Promise<void>>();
  private readonly controllers = new Map<string, AbortController>();
  private readonly maxConcurrent: number;
  private readonly tokens: IdempotencyTokens;

  constructor(opts: ImageServiceOpts) {
    this.opts = opts;
    this.db = opts.db;
    this.engine = opts.engine;
    this.limits = { ...(opts.limits ?? DEFAULT_ARCHIVE_LIMITS) };
    this.maxConcurrent = opts.maxConcurrentBuilds ?? Math.max(1, Math.floor(cpus().length / 2));
    this.tokens = new IdempotencyTokens(opts.db);
  }

  get stagingDir(): string {
    return join(this.opts.imagesDir, ".staging");
  }

  get archiveLimits(): ArchiveLimits {
    return this.limits;
  }

  get s3(): S3Config | undefined {
    return this.opts.s3;
  }

  get httpsCa(): string | undefined {
    return this.opts.httpsCa;
  }

  /**
   * After a restart: a build cut short is FAILED; nothing half-built stays.
   * Its build VM was a template, which the engine ended when it opened.
   */
  async start(): Promise<void> {
    await rm(this.stagingDir, { recursive: true, force: true });
    const rows = await this.db.selectFrom("images").selectAll().where("state", "in", ["PENDING", "BUILDING", "DELETING"]).execute();
    for (const row of rows) {
      const dir = this.dirOf(row.id);
      await rm(join(dir, "snapshot"), { recursive: true, force: true });
      await rm(join(dir, "code.zip"), { force: true });
      if (row.state === "DELETING") await this.removeRow(row);
      else await this.transition(row, "FAILED", { state_reason: "the server restarted during the build" });
    }
  }

  /** Lets running builds finish their cleanup (tests, shutdown): aborts them and waits. */
  async close(): Promise<void> {
    for (const c of this.controllers.values()) c.abort(new BuildError("the server is shutting down"));
    await Promise.allSettled([...this.builds]);
  }

  /**
   * Checks the archive and the Dockerfile (400 naming the entry or the line),
   * records a new version of the image as BUILDING and queues its build.
   * The staged code file is consumed (moved or removed) in every case.
   */
  async create(tenantId: string, req: CreateImageRequest): Promise<ImageRow> {
    try {
      if (!NAME.test(req.name)) throw new ApiError("ValidationError", `name must match ${NAME.source}, got "${req.name}"`, { field: "name" });
      if (RESERVED.has(req.name)) throw new ApiError("ValidationError", `name ${req.name} is reserved for a built-in image`, { field: "name" });
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
      const plan = planDockerfile(dockerfile, { buildArgs: req.buildArgs, parentConfig: (n) => parents.get(n)?.config });
      if (req.baseImage !== undefined) checkManagedBase(plan, req.baseImage);
      plan.config.env = { ...plan.config.env, ...req.env };
      const parent = plan.base.kind === "image" ? parents.get(plan.base.name)!.row : undefined;
      const row = await this.names.run(`${tenantId}/${req.name}`, async () => {
        const last = await this.db
          .selectFrom("images")
          .select((eb) => eb.fn.max<number>("version").as("v"))
          .where("tenant_id", "=", tenantId)
          .where("name", "=", req.name)
          .executeTakeFirst();
        const id = `img-${randomBytes(8).toString("hex")}`;
        const newRow: ImageRow = {
          id,
          tenant_id: tenantId,
          name: req.name,
          version: (last?.v ?? 0) + 1,
          state: "BUILDING",
          state_reason: null,
          created_at: new Date().toISOString(),
          ready_at: null,
          size_bytes: 0,
          disk_bytes: 0,
          memory_bytes: 0,
          app_port: plan.config.appPort ?? null,
          vcpus,
          memory_mib: memoryMiB,
          disk_gib: parent?.disk_gib ?? BASE_ROOTFS_RECIPE.diskGiB,
          dockerfile_digest: `sha256:${sha256(dockerfile)}`,
          code_digest: `sha256:${req.code.sha256}`,
          code_source: req.code.source,
          parent_image_id: parent?.id ?? null,
          config: JSON.stringify(plan.config),
          build_ms: null,
          status: "ACTIVE",
          hooks: hooks ? JSON.stringify(hooks) : null,
          description: req.description ?? null,
          base_image: req.baseImage ?? null,
          egress_connectors: req.egressConnectors ? JSON.stringify(req.egressConnectors) : null,
          aws_fields: req.awsFields ? JSON.stringify(req.awsFields) : null,
        };
        await mkdir(this.dirOf(id), { recursive: true });
        await rename(req.code.path, join(this.dirOf(id), "code.zip"));
        await this.db.insertInto("images").values(newRow).execute();
        if (req.tags) await tagResource(this.db, tenantId, { type: "microvm-image", id: req.name }, req.tags);
        return newRow;
      });
      this.startBuild(row, plan, archive, parent, hooks);
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
    const dir = join(this.dirOf(row.id), "snapshot");
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
        return this.engine.loadSnapshot(dir);
      },
    };
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
   * Deletes one version (by id) or every version (by name). 409 while it is
   * building, while microVMs use it (unless `force`: they are terminated), or
   * while another image is built on it (its disk backs theirs; force does not
   * override that).
   */
  async delete(tenantId: string, idOrName: string, force: boolean): Promise<string[]> {
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
    const users = await this.db.selectFrom("microvms").select(["id", "state"]).where("image_id", "in", ids).where("state", "!=", "TERMINATED").execute();
    const live = users.filter((u) => u.state !== "FAILED");
    if (live.length && !force) {
      throw new ApiError("Conflict", `image ${idOrName} is used by ${live.length} microVM(s) (${live.map((u) => u.id).join(", ")}); terminate them or add ?force=true`, {
        microVms: live.map((u) => u.id),
      });
    }
    for (const r of rows) await this.transition(r, "DELETING");
    for (const u of users) await this.opts.terminateVm(tenantId, u.id, `image ${idOrName} deleted`).catch((err: Error) => this.opts.log?.(`terminating ${u.id}: ${err.message}`));
    for (const r of rows) await this.removeRow(r);
    const left = await this.db.selectFrom("images").select("id").where("tenant_id", "=", tenantId).where("name", "=", one.name).executeTakeFirst();
    if (!left) await deleteTags(this.db, tenantId, { type: "microvm-image", id: one.name });
    return ids;
  }

  // ---- builds ------------------------------------------------------------------

  private startBuild(row: ImageRow, plan: BuildPlan, archive: CodeArchive, parent: ImageRow | undefined, hooks: ImageHooks | undefined): void {
    const dir = this.dirOf(row.id);
    const log = new BuildLog(join(dir, "build.log"));
    this.logs.set(row.id, log);
    const controller = new AbortController();
    this.controllers.set(row.id, controller);
    const build = (async () => {
      const started = Date.now();
      try {
        log.line(`==> image ${row.name} version ${row.version} (${row.id}); Dockerfile ${row.dockerfile_digest}, code ${row.code_digest}`);
        if (this.running >= this.maxConcurrent) {
          log.line(`==> waiting for a build slot (${this.running} builds running)`);
          await new Promise<void>((resolve, reject) => {
            const take = () => {
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
        this.running++;
        const timeoutMs = this.opts.buildTimeoutMs ?? 600_000;
        const timer = setTimeout(() => controller.abort(new BuildError(`the build timed out after ${Math.round(timeoutMs / 1000)} s`)), timeoutMs);
        try {
          const backingDisk =
            plan.base.kind === "debian" ? this.opts.rootfs : plan.base.kind === "scratch" ? await prepareScratchDisk(this.opts.assetsDir, this.opts.log) : join(this.dirOf(parent!.id), "snapshot", "disk.qcow2");
          await buildInVm(this.engine, {
            plan,
            zipPath: join(dir, "code.zip"),
            archive,
            backingDisk,
            dir: join(dir, "snapshot"),
            vcpus: row.vcpus,
            memoryMiB: row.memory_mib,
            log,
            signal: controller.signal,
            readyTimeoutMs: Math.min(this.opts.readyTimeoutMs ?? 120_000, timeoutMs),
            settleMs: this.opts.settleMs ?? 2000,
            hooks,
          });
        } finally {
          clearTimeout(timer);
          this.running--;
          this.queue.shift()?.();
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
        });
      } catch (err) {
        const reason = controller.signal.aborted && controller.signal.reason instanceof Error ? controller.signal.reason.message : (err as Error).message;
        const userFacing = err instanceof BuildError || controller.signal.aborted;
        log.line(`==> FAILED: ${userFacing ? reason : `internal error: ${reason}`}`);
        if (!userFacing) this.opts.log?.(`image ${row.id} build failed: ${(err as Error).stack ?? reason}`);
        // Nothing half-published: the snapshot directory goes, the log stays.
        await rm(join(dir, "snapshot"), { recursive: true, force: true });
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

  /** READY images of a tenant by name (latest version), with their configs: the possible FROM parents. */
  private async readyByName(tenantId: string): Promise<Map<string, { row: ImageRow; config: ImageConfig }>> {
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
    await this.db.deleteFrom("images").where("id", "=", row.id).execute();
  }

  /** The only writer of images.state. */
  private async transition(row: ImageRow, to: ImageState, update: ImageUpdate = {}): Promise<void> {
    const current = await this.db.selectFrom("images").select("state").where("id", "=", row.id).executeTakeFirstOrThrow();
    checkImageTransition(row.id, current.state as ImageState, to, to.toLowerCase());
    await this.db.updateTable("images").set({ ...update, state: to }).where("id", "=", row.id).execute();
  }
}

async function allocated(path: string): Promise<number> {
  const st = await stat(path);
  return st.blocks * 512;
}

const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(1);

/** A build on a managed base must keep that base: the Dockerfile's own FROM, if any, has to name the same image. */
function checkManagedBase(plan: BuildPlan, baseImage: string): void {
  const expected = planDockerfile(`FROM ${baseImage}\n`, { parentConfig: () => undefined }).base;
  if (JSON.stringify(plan.base) !== JSON.stringify(expected)) {
    throw new ApiError("ValidationError", `the Dockerfile's FROM (line ${plan.fromLine}) names another base than the managed image ${baseImage}; remove the FROM line or make it FROM ${baseImage}`, {
      field: "dockerfile",
    });
  }
}
