import { randomBytes } from "node:crypto";
import { sql } from "kysely";
import { cpus, totalmem } from "node:os";
import { ApiError, checkIntRange } from "../errors.ts";
import type { ImageCatalog } from "../images/catalog.ts";
import { MANAGED_VERSION, type ManagedImageView } from "../images/managed.ts";
import { callHook, HOOK_LIMITS, type HookName, type ImageHooks } from "../images/hooks.ts";
import type { Db } from "../store/db.ts";
import { IdempotencyTokens } from "../store/idempotency.ts";
import { serialized } from "../store/locks.ts";
import { activeNodeUrl, handOverSuspended, liveUsage, ownedBy, TryPeersError, type ClusterNode, type Tx } from "./cluster.ts";
import { checkQuota } from "../store/tenants.ts";
import { NODE_FAILURE_POLICIES, type ImageRow, type MicroVmRow, type MicroVmUpdate, type NodeFailurePolicy } from "../store/schema.ts";
import { KeyedMutex } from "../util/keyed-mutex.ts";
import { newVmId, VM_LIMITS, type Engine, type MicroVm } from "../vmm/engine.ts";
import { hostMemoryBudget, memAvailableMiB, privateMemoryMiB, type HostMemoryBudget } from "../vmm/host-memory.ts";
import { parseEgress, type Egress } from "../vmm/network/policy.ts";
import type { LifecycleObserver } from "../telemetry/metrics.ts";
import { decideAdmission, type HostCapacity, type HostUsage } from "./admission.ts";
import { NetworkConnectors } from "./connectors.ts";
import { VolumeService, type VolumeRequest } from "./volumes.ts";
import type { SuspendedObjects } from "./suspended-objects.ts";
import { DEFAULT_SHAPE } from "../images/base-image.ts";
import { canTransition, checkTransition, holdsHostResources, invalidState, MICROVM_STATES, reconcileState, statesBefore, type MicroVmState } from "./states.ts";

/** A create request after validation by the API's schema (ranges are checked here). */
export interface CreateMicroVmRequest {
  image: string;
  /** A version of the image (default: its latest READY, ACTIVE one). */
  imageVersion?: number;
  vcpus?: number;
  memoryMiB?: number;
  diskGiB?: number;
  env?: Record<string, string>;
  /** terminateAfterSuspendedSeconds: a VM suspended this long is terminated (0, the default, never). */
  idlePolicy?: { suspendAfterSeconds?: number; autoResume?: boolean; terminateAfterSuspendedSeconds?: number };
  /** Cluster (docs/cluster.md): a running VM whose node fails is FAILED ("fail", the default) or restored from its last published suspend ("restore"). */
  onNodeFailure?: NodeFailurePolicy;
  maxRuntimeSeconds?: number;
  /** `egress` directly, or named connectors (lifecycle/connectors.ts); default: the image's connectors, else "none". */
  network?: { egress?: Egress; egressConnectors?: string[] };
  /** The body of the image's `/run` hook (at most 16 KiB). */
  runHookPayload?: string;
  /** Idempotency: a retry with the same token and request returns the same VM (store/idempotency.ts). */
  clientToken?: string;
  endpoint?: { public?: boolean };
  /** Guest port the VM's endpoint forwards to (default: the image's EXPOSE). */
  appPort?: number;
  metadata?: Record<string, unknown>;
  /** Persistent volumes to attach, in order (lifecycle/volumes.ts). */
  volumes?: VolumeRequest[];
}

export const LIMITS = {
  ...VM_LIMITS,
  maxRuntimeSeconds: { min: 1, max: 28_800 },
  suspendAfterSeconds: { min: 0, max: 28_800 },
  terminateAfterSuspendedSeconds: { min: 0, max: 28_800 },
  appPort: { min: 1, max: 65_535 },
  /** Children of one fork call. */
  forkCount: { min: 1, max: 16 },
} as const;

/**
 * Host capacity for live VMs: cores × vcpuOvercommit, memory × memoryOvercommit
 * committed, and the real-memory budget (see admission.ts).
 */
export function hostCapacity(overcommit: { vcpu: number; memory: number } = { vcpu: 128, memory: 4 }, budget: HostMemoryBudget = hostMemoryBudget()): HostCapacity {
  return { vcpus: Math.floor(cpus().length * overcommit.vcpu), memoryMiB: Math.floor((totalmem() / 2 ** 20) * overcommit.memory), real: budget };
}

export type { HostCapacity } from "./admission.ts";

export interface MicroVmEvent {
  type: string;
  message: string;
  at: string;
}

/**
 * The MicroVM lifecycle: every state change goes through here, serialized per
 * VM, and is recorded only once what it depends on is done (the engine has
 * finished and its files are durable). Also runs the idle-suspend and
 * max-runtime policies, and reconciles the database with the engine at start.
 */
export class MicroVmService {
  private readonly locks = new KeyedMutex();
  /** Lifecycle operations under way, which a graceful shutdown lets finish (`drain`). */
  private readonly inFlight = new Set<Promise<unknown>>();
  private policyTimer: NodeJS.Timeout | undefined;
  /** When each VM's activity was last written (see touch). */
  private readonly lastTouch = new Map<string, number>();

  private readonly db: Db;
  private readonly engine: Engine;
  private readonly images: ImageCatalog;
  private readonly capacity: HostCapacity;
  private readonly observer: LifecycleObserver | undefined;
  private readonly log: (line: string) => void;
  private readonly tokens: IdempotencyTokens;
  /** On a cluster (docs/cluster.md), this server's node: it admits, runs and writes only its own VMs. */
  private readonly cluster: ClusterNode | undefined;
  /** On a cluster with an object store: where suspends are published, so that any node can resume them. */
  private readonly objects: SuspendedObjects | undefined;
  /** Restored VMs this node is resuming now (resumeRestored). */
  private readonly restoring = new Set<string>();
  readonly connectors: NetworkConnectors;
  readonly volumes: VolumeService;

  constructor(opts: {
    db: Db;
    engine: Engine;
    images: ImageCatalog;
    /** Default: hostCapacity() of this host. */
    capacity?: HostCapacity;
    /** Receives launch/suspend/resume latencies (telemetry). */
    observer?: LifecycleObserver;
    log?: (line: string) => void;
    /** This server's node on a cluster, registered; none on a single host. */
    cluster?: ClusterNode;
    /** With `cluster`: the object store suspended VMs move through (docs/cluster.md). */
    objects?: SuspendedObjects;
  }) {
    this.db = opts.db;
    this.engine = opts.engine;
    this.images = opts.images;
    this.capacity = opts.capacity ?? hostCapacity();
    this.observer = opts.observer;
    this.cluster = opts.cluster;
    this.objects = opts.cluster ? opts.objects : undefined;
    this.log = opts.log ?? (() => undefined);
    this.tokens = new IdempotencyTokens(opts.db);
    this.connectors = new NetworkConnectors(opts.db);
    this.volumes = new VolumeService(opts.db, opts.engine, opts.cluster !== undefined);
    this.engine.on("exit", (vm: MicroVm, reason: string) => void this.onEngineExit(vm.id, reason));
  }

  /**
   * Brings the database in line with the VMs the engine re-adopted
   * (`reconcileState`), ends engine VMs nobody owns, then starts the policy loop.
   */
  async start(policyIntervalMs = 1000): Promise<void> {
    const rows = await this.mine(this.db.selectFrom("microvms").selectAll().where("state", "not in", ["TERMINATED", "FAILED"])).execute();
    const known = new Set(rows.map((r) => r.id));
    for (const row of rows) {
      const vm = this.engine.list().find((v) => v.id === row.id);
      // Handed to this node (or its fetch cut short) before it ran here: its files are in the object store, not on this disk.
      if (!vm && this.objects && row.suspended_object && row.suspended_node !== this.cluster?.id && (row.state === "SUSPENDED" || row.state === "RESUMING")) {
        if (row.state === "RESUMING") await this.transition(row.id, row.tenant_id, "SUSPENDED", {}, "reconciled", "RESUMING → SUSPENDED: the server restarted while fetching it; it is still in the object store");
        continue;
      }
      const r = reconcileState(row.state, vm?.status, vm?.record.failureReason);
      if (r.endEngineVm) await this.engine.terminate(row.id).catch((err: Error) => this.log(`ending ${row.id} after a restart: ${err.message}`));
      if (r.state === row.state) continue;
      const message = `${row.state} → ${r.state}${r.reason ? `: ${r.reason}` : ""}`;
      await this.transition(row.id, row.tenant_id, r.state, {
        state_reason: r.state === "FAILED" ? (r.reason ?? null) : null,
        ...(r.state === "TERMINATED" ? { terminated_at: new Date().toISOString() } : {}),
      }, "reconciled", message);
    }
    // A VM the engine has but the database does not was launched by a server
    // that died before recording it: nobody owns it.
    for (const vm of this.engine.list()) if (!known.has(vm.id)) await this.engine.terminate(vm.id);
    await this.volumes.sweep();
    this.policyTimer = setInterval(() => void this.applyPolicies(), policyIntervalMs);
  }

  stop(): void {
    clearInterval(this.policyTimer);
  }

  /** Waits (at most `timeoutMs`) for the lifecycle operations under way to finish: a graceful shutdown's first step. */
  async drain(timeoutMs: number): Promise<void> {
    const timeout = new Promise<void>((resolve) => setTimeout(resolve, timeoutMs).unref());
    await Promise.race([Promise.allSettled([...this.inFlight]), timeout]);
  }

  /** Runs a lifecycle operation counted by `drain`. */
  private track<T>(operation: Promise<T>): Promise<T> {
    this.inFlight.add(operation);
    void operation.finally(() => this.inFlight.delete(operation)).catch(() => undefined);
    return operation;
  }

  /**
   * Suspends every RUNNING VM to disk (graceful server shutdown); they resume
   * on their next request. The server's own doing: no tenant quota applies.
   */
  async suspendAll(): Promise<void> {
    const rows = await this.mine(this.db.selectFrom("microvms").select(["id", "tenant_id"]).where("state", "=", "RUNNING")).execute();
    for (const row of rows) {
      await this.suspend(row.tenant_id, row.id, SHUTDOWN).catch((err: Error) => this.log(`suspending ${row.id} at shutdown: ${err.message}`));
    }
    // Their uploads to the object store (publishSuspended), so that other nodes can resume them while this one is down.
    await this.drain(120_000);
  }

  /**
   * Creates a VM: validates, admits it and records it PENDING in one step
   * (so concurrent creates cannot overcommit the host), launches it, applies
   * its environment, calls its `/run` hook and records it RUNNING. A launch
   * that fails leaves the VM FAILED with the reason. With a `clientToken`, a
   * retry of the same request returns the same VM.
   */
  create(tenantId: string, req: CreateMicroVmRequest): Promise<MicroVmRow> {
    return this.track(this.createOnce(tenantId, req));
  }

  private async createOnce(tenantId: string, req: CreateMicroVmRequest): Promise<MicroVmRow> {
    if (req.clientToken === undefined) return this.launch(tenantId, req);
    const { clientToken, ...request } = req;
    const { resourceId } = await this.tokens.run({ tenantId, operation: "create-microvm", token: clientToken }, request, async () => (await this.launch(tenantId, request)).id);
    return this.get(tenantId, resourceId);
  }

  private async launch(tenantId: string, req: CreateMicroVmRequest): Promise<MicroVmRow> {
    const image = await this.images.resolve(tenantId, req.image, req.imageVersion);
    if (this.cluster && image.version !== MANAGED_VERSION) {
      // A tenant's image is on the disk of the node that built it: its VMs launch there, unless it is published
      // to the object store and this node runs the QEMU build that made it (it pulls it on first use: images/image-cache.ts).
      const built = await this.db
        .selectFrom("images")
        .leftJoin("nodes", "nodes.id", "images.node_id")
        .select(["images.node_id", "images.snapshot_object", "nodes.qemu_build", "nodes.accelerator"])
        .where("images.id", "=", image.imageId)
        .executeTakeFirst();
      const pullable = this.objects && built?.snapshot_object && built.qemu_build === this.cluster.info.qemuBuild && built.accelerator === this.cluster.info.accelerator;
      if (built?.node_id && built.node_id !== this.cluster.id && !pullable) {
        const url = await activeNodeUrl(this.db, built.node_id);
        const why = new ApiError("MisdirectedRequest", `image ${image.name} version ${image.version} is on node ${built.node_id}${url ? "" : ", which takes no VMs now"}`, { node: built.node_id });
        throw new TryPeersError(why, url ? [url] : []);
      }
    }
    // A Dockerfile image has the shape it was built (snapshotted) with.
    const shape = { vcpus: req.vcpus ?? image.shape?.vcpus ?? 1, memoryMiB: req.memoryMiB ?? image.shape?.memoryMiB ?? 512 };
    const diskGiB = req.diskGiB ?? image.diskGiB;
    checkRange("vcpus", shape.vcpus);
    checkRange("memoryMiB", shape.memoryMiB);
    checkRange("diskGiB", diskGiB);
    if (diskGiB < image.diskGiB) {
      throw new ApiError("ValidationError", `diskGiB must be at least ${image.diskGiB} for image ${image.name}: its filesystem is that size (disks grow, never shrink)`, { field: "diskGiB" });
    }
    const maxRuntimeSeconds = req.maxRuntimeSeconds ?? LIMITS.maxRuntimeSeconds.max;
    checkRange("maxRuntimeSeconds", maxRuntimeSeconds);
    const suspendAfterSeconds = req.idlePolicy?.suspendAfterSeconds ?? 900;
    checkRange("suspendAfterSeconds", suspendAfterSeconds, "idlePolicy.suspendAfterSeconds");
    const terminateAfterSuspendedSeconds = req.idlePolicy?.terminateAfterSuspendedSeconds ?? 0;
    checkRange("terminateAfterSuspendedSeconds", terminateAfterSuspendedSeconds, "idlePolicy.terminateAfterSuspendedSeconds");
    if (req.network?.egress !== undefined && req.network.egressConnectors !== undefined) {
      throw new ApiError("ValidationError", "network: give egress or egressConnectors, not both", { field: "network.egressConnectors" });
    }
    const connectorNames = req.network?.egressConnectors ?? (req.network?.egress === undefined ? image.egressConnectors : undefined);
    const egress = connectorNames ? await this.connectors.egressOf(connectorNames, "network.egressConnectors") : parseEgress(req.network?.egress);
    const runHookPayload = req.runHookPayload === undefined ? undefined : Buffer.from(req.runHookPayload, "utf8");
    if (runHookPayload && runHookPayload.length > HOOK_LIMITS.runPayloadBytes) {
      throw new ApiError("ValidationError", `runHookPayload holds at most ${HOOK_LIMITS.runPayloadBytes} bytes, got ${runHookPayload.length}`, { field: "runHookPayload" });
    }
    const appPort = req.appPort ?? image.appPort;
    if (appPort !== undefined) checkRange("appPort", appPort);
    const onNodeFailure = req.onNodeFailure ?? "fail";
    if (!NODE_FAILURE_POLICIES.includes(onNodeFailure)) {
      throw new ApiError("ValidationError", `onNodeFailure must be one of ${NODE_FAILURE_POLICIES.map((p) => `"${p}"`).join(", ")}, got ${JSON.stringify(onNodeFailure).slice(0, 64)}`, { field: "onNodeFailure" });
    }
    const volumes = await this.volumes.resolve(tenantId, req.volumes ?? []);
    // Validates the shape against the image, and builds a base snapshot of a new shape once.
    const snapshot = await image.snapshotFor(shape);

    const now = new Date();
    const pending: MicroVmRow = {
      id: newVmId(),
      tenant_id: tenantId,
      image_name: image.name,
      image_id: image.imageId,
      state: "PENDING",
      state_reason: null,
      vcpus: shape.vcpus,
      memory_mib: shape.memoryMiB,
      disk_gib: diskGiB,
      env: JSON.stringify(req.env ?? {}),
      suspend_after_seconds: suspendAfterSeconds,
      auto_resume: req.idlePolicy?.autoResume === false ? 0 : 1,
      max_runtime_seconds: maxRuntimeSeconds,
      egress: JSON.stringify(egress),
      endpoint_public: req.endpoint?.public ? 1 : 0,
      endpoint_token: newEndpointToken(),
      app_port: appPort ?? null,
      metadata: JSON.stringify(req.metadata ?? {}),
      created_at: now.toISOString(),
      expires_at: new Date(now.getTime() + maxRuntimeSeconds * 1000).toISOString(),
      last_activity_at: now.toISOString(),
      terminated_at: null,
      terminate_after_suspended_seconds: terminateAfterSuspendedSeconds,
      suspended_at: null,
      egress_connectors: connectorNames ? JSON.stringify(connectorNames) : null,
      hooks: image.hooks ? JSON.stringify(image.hooks) : null,
      image_version: image.version,
      forked_from: null,
      node_id: null,
      node_epoch: null,
      suspended_node: null,
      suspended_object: null,
      suspended_manifest: null,
      on_node_failure: onNodeFailure,
      restore_object: null,
      restore_manifest: null,
      restore_point_at: null,
    };
    // Admission and the PENDING row in one critical section: the row is what the next admission counts.
    // Its volume attachments go in with it, under the tenant's volume lock (a delete or another attach waits).
    const admit = () =>
      this.admitted(shape, async (tx) => {
        const owner = this.cluster?.owner();
        await tx.insertInto("microvms").values({ ...pending, node_id: owner?.nodeId ?? null, node_epoch: owner?.epoch ?? null }).execute();
        await this.volumes.attach(tx, tenantId, pending.id, volumes);
      });
    await (volumes.length > 0 ? this.volumes.lock(tenantId, admit) : admit()).catch(async (err: unknown) => {
      // A cluster node without room offers the create to its peers (the router forwards it), for images every node has.
      if (this.cluster && err instanceof ApiError && err.code === "CapacityExceeded" && image.version === MANAGED_VERSION) {
        throw new TryPeersError(err, await this.cluster.peersWithRoom(shape));
      }
      throw err;
    });
    const started = performance.now();
    // Held until RUNNING: a terminate or suspend of the PENDING VM waits for its launch to finish.
    return this.locks.run(pending.id, async () => {
      let vm: MicroVm | undefined;
      try {
        vm = await this.engine.launch(snapshot, {
          id: pending.id,
          egress,
          guestPorts: appPort ? [appPort] : [],
          diskGiB,
          volumes: volumes.map((v) => ({ volumeId: v.volumeId, path: v.path, readOnly: v.readOnly })),
        });
        // PUT /env replaces the base env: keep the image's ENV under the request's.
        if (req.env && Object.keys(req.env).length > 0) await vm.agent.setEnv({ ...image.env, ...req.env });
        await this.runHook(pending, "run", runHookPayload);
      } catch (err) {
        // No half-made VM: one that was launched but could not be set up is ended.
        if (vm) await this.engine.terminate(vm.id).catch(() => undefined);
        const reason = err instanceof ApiError ? err.message : `the launch failed: ${(err as Error).message}`;
        await this.transition(pending.id, tenantId, "FAILED", { state_reason: reason }, "failed", reason).catch(() => undefined);
        throw err;
      }
      const message = `launched from image ${image.name} version ${image.version} (${shape.vcpus} vCPU, ${shape.memoryMiB} MiB)`;
      const row = await this.transition(pending.id, tenantId, "RUNNING", { last_activity_at: new Date().toISOString() }, "created", message);
      this.observer?.observe("launch", (performance.now() - started) / 1000);
      return row;
    });
  }

  /**
   * A named snapshot of a RUNNING VM: a new version of image `name` holding
   * its memory, devices and disk as they are now, launchable like any image.
   * The VM runs on; it is paused only while its state is captured.
   */
  snapshot(tenantId: string, id: string, name: string): Promise<ImageRow> {
    return this.track(
      this.locks.run(id, async () => {
        const row = await this.getHere(tenantId, id);
        const images = this.images.built;
        if (!images) throw new ApiError("Conflict", "this server keeps no tenant images, so it cannot keep snapshots");
        if (row.state !== "RUNNING") throw invalidState(id, row.state, "snapshot");
        await this.refuseWithVolumes(id, "snapshot");
        const { row: image, pauseMs } = await images.createSnapshot(tenantId, { name, vm: row }, (dir) => this.engine.snapshotRunning(id, dir));
        this.observer?.observe("snapshot_pause", pauseMs / 1000);
        const message = `snapshot ${image.name} version ${image.version} (${image.id}) taken; paused ${Math.round(pauseMs)} ms`;
        await this.db.insertInto("events").values(event(id, tenantId, "snapshot", message)).execute();
        return image;
      }),
    );
  }

  /**
   * Forks a RUNNING VM into `count` new VMs with its memory, processes and
   * disk of one instant, each with an identity of its own (agent secret,
   * hostname, machine-id, entropy, clock, endpoint token) and its own copy
   * of the parent's settings; the parent runs on. The children are admitted
   * and recorded PENDING in one step, as a create is. A child whose restore
   * fails is FAILED with the reason; if every child fails, the error is thrown.
   */
  fork(tenantId: string, id: string, count: number): Promise<MicroVmRow[]> {
    checkRange("forkCount", count, "count");
    return this.track(
      this.locks.run(id, async () => {
        const parent = await this.getHere(tenantId, id);
        if (parent.state !== "RUNNING") throw invalidState(id, parent.state, "fork");
        await this.refuseWithVolumes(id, "fork");
        const now = new Date();
        const children: MicroVmRow[] = Array.from({ length: count }, () => ({
          ...parent,
          id: newVmId(),
          state: "PENDING",
          state_reason: null,
          endpoint_token: newEndpointToken(),
          created_at: now.toISOString(),
          expires_at: new Date(now.getTime() + parent.max_runtime_seconds * 1000).toISOString(),
          last_activity_at: now.toISOString(),
          terminated_at: null,
          suspended_at: null,
          suspended_node: null,
          suspended_object: null,
          suspended_manifest: null,
          // A child keeps its parent's choice, not its restore point: it has none until its own first published suspend.
          restore_object: null,
          restore_manifest: null,
          restore_point_at: null,
          forked_from: parent.id,
        }));
        // Children run where their parent does: on a cluster, this node, at its current epoch.
        await this.admitted({ vcpus: parent.vcpus * count, memoryMiB: parent.memory_mib * count }, async (tx) => {
          const owner = this.cluster?.owner();
          await tx.insertInto("microvms").values(children.map((c) => ({ ...c, node_id: owner?.nodeId ?? null, node_epoch: owner?.epoch ?? null }))).execute();
        });
        const started = performance.now();
        // Held until each child is RUNNING or FAILED, as a create holds its VM's.
        return underLocks(this.locks, children.map((c) => c.id), async () => {
          let forked: Awaited<ReturnType<Engine["fork"]>>;
          try {
            forked = await this.engine.fork(id, children.map((c) => c.id));
          } catch (err) {
            const reason = `the fork failed: ${(err as Error).message}`;
            for (const c of children) await this.transition(c.id, tenantId, "FAILED", { state_reason: reason }, "failed", reason).catch(() => undefined);
            throw err;
          }
          const rows: MicroVmRow[] = [];
          for (const [i, child] of children.entries()) {
            const result = forked.children[i]!;
            if (result instanceof Error) {
              const reason = `the fork failed: ${result.message}`;
              rows.push(await this.transition(child.id, tenantId, "FAILED", { state_reason: reason }, "failed", reason));
            } else {
              rows.push(await this.transition(child.id, tenantId, "RUNNING", { last_activity_at: new Date().toISOString() }, "created", `forked from ${id}`));
            }
          }
          const running = rows.filter((r) => r.state === "RUNNING").length;
          if (running === 0) throw forked.children[0] as Error;
          this.observer?.observe("snapshot_pause", forked.pauseMs / 1000);
          this.observer?.observe("fork", (performance.now() - started) / 1000);
          const message = `forked into ${rows.map((r) => r.id).join(", ")} (${running} of ${count} running); paused ${Math.round(forked.pauseMs)} ms`;
          await this.db.insertInto("events").values(event(id, tenantId, "forked", message)).execute();
          return rows;
        });
      }),
    );
  }

  /** The VM whatever its tenant: only for the endpoint router, which authorizes by the VM's own token. */
  async getAnyTenant(id: string): Promise<MicroVmRow | undefined> {
    return this.db.selectFrom("microvms").selectAll().where("id", "=", id).executeTakeFirst();
  }

  /** The VM if it belongs to the tenant; another tenant's VM is NotFound. */
  async get(tenantId: string, id: string): Promise<MicroVmRow> {
    const row = await this.db.selectFrom("microvms").selectAll().where("id", "=", id).where("tenant_id", "=", tenantId).executeTakeFirst();
    if (!row) throw new ApiError("NotFound", `microVM ${id} not found`);
    return row;
  }

  /**
   * On a cluster, the URL of the live node other than this one that runs VM
   * `id` (of `tenantId` when given), where calls on it are forwarded. A
   * suspended VM that leaves its node (movable; its own node too, when
   * draining) is first handed over to the node every node picks to resume
   * it (handOverSuspended): whichever node wins, concurrent requests through
   * any nodes go to it. Undefined when that is this node, its node is not
   * live, no node has room for it, or there is no such VM.
   */
  async ownerUrl(id: string, tenantId?: string): Promise<string | undefined> {
    if (!this.cluster) return undefined;
    // A VM that leaves its node is handed over first, then routed like any other: to whichever node won it.
    for (let handOvers = 0; ; handOvers++) {
      const row = await this.db
        .selectFrom("microvms")
        .leftJoin("nodes", "nodes.id", "microvms.node_id")
        .selectAll("microvms")
        .select(["nodes.url", "nodes.state as node_state", "nodes.qemu_build", "nodes.accelerator"])
        .select(sql<boolean>`coalesce(nodes.state != 'dead' and nodes.lease_expires_at > now(), false)`.as("node_live"))
        .where("microvms.id", "=", id)
        .$if(tenantId !== undefined, (qb) => qb.where("microvms.tenant_id", "=", tenantId!))
        .executeTakeFirst();
      if (!row) return undefined;
      // This node's own VM too, when it drains: it takes no VMs, a peer resumes it.
      // (No node: a VM restored after its node failed.)
      const node = row.node_state !== null && row.qemu_build !== null && row.accelerator !== null ? { state: row.node_state, live: row.node_live, qemu_build: row.qemu_build, accelerator: row.accelerator } : undefined;
      if (handOvers < 3 && this.movable(row, node)) {
        // None has room: this node answers (503). Won or lost (another node handed it elsewhere
        // meanwhile), the row now names the node to go to.
        if (!(await this.handOver(row))) return undefined;
        continue;
      }
      return row.node_live && row.node_id !== this.cluster.id ? (row.url ?? undefined) : undefined;
    }
  }

  /**
   * get(), for a call that acts on the VM: on a cluster the VM must be this
   * node's (MisdirectedRequest names its node otherwise). With `claimOrphan`
   * (terminate), a VM whose node is dead and that runs nowhere (FAILED,
   * SUSPENDED, TERMINATED) becomes this node's, in one conditional update.
   * With `resuming` (a call that resumes it), a VM that must leave its node
   * is handed over to the node every node picks for it (handOverSuspended):
   * returned when that is this one, CapacityExceeded when none has room.
   */
  private async getHere(tenantId: string, id: string, opts: { claimOrphan?: boolean; resuming?: boolean } = {}): Promise<MicroVmRow> {
    const row = await this.get(tenantId, id);
    if (!this.cluster || row.node_id === this.cluster.id) return row;
    const node = row.node_id
      ? await this.db.selectFrom("nodes").select(["id", "url", "state", "qemu_build", "accelerator"]).select(sql<boolean>`state != 'dead' and lease_expires_at > now()`.as("live")).where("id", "=", row.node_id).executeTakeFirst()
      : undefined;
    // A published suspend whose node takes no VMs (draining, dead, none) is handed over first, as the router does (ownerUrl):
    // a request reaches here so only when no node had room; a resume of this node's own choosing (resumeRestored) takes it here.
    if (opts.resuming && this.movable(row, node)) {
      if (!(await this.handOver(row))) {
        throw new ApiError("CapacityExceeded", `microVM ${id} must move off node ${row.node_id ?? "(none)"}, which takes no VMs now, and no node has room for it (${row.vcpus} vCPU, ${row.memory_mib} MiB)`, { node: row.node_id });
      }
      const handed = await this.get(tenantId, id);
      if (handed.node_id === this.cluster.id) return handed;
      throw new ApiError("MisdirectedRequest", `microVM ${id} was handed to node ${handed.node_id ?? "(none)"} to resume it`, { node: handed.node_id });
    }
    if (opts.claimOrphan && !node?.live && ["FAILED", "SUSPENDED", "TERMINATED"].includes(row.state)) {
      const owner = this.cluster.owner();
      const claimed = await this.db
        .updateTable("microvms")
        .set({ node_id: owner.nodeId, node_epoch: owner.epoch })
        .where("id", "=", id)
        .where("node_id", "=", row.node_id)
        .where("node_epoch", "=", row.node_epoch)
        .returningAll()
        .executeTakeFirst();
      if (claimed) return claimed;
    }
    throw new ApiError("MisdirectedRequest", `microVM ${id} is run by node ${row.node_id ?? "(none)"}${node?.live ? ` (${node.url})` : ", which is not live"}`, { node: row.node_id, url: node?.live ? node.url : undefined });
  }

  /**
   * Hands `row`, a suspended VM that must leave its node (movable), to the
   * node every node picks to resume it (handOverSuspended: one of concurrent
   * hand-overs wins, the row then names its node). False when no node has room.
   */
  private async handOver(row: MicroVmRow): Promise<boolean> {
    const target = await this.cluster!.moveTarget({ vcpus: row.vcpus, memoryMiB: row.memory_mib });
    if (!target) return false;
    await handOverSuspended(this.db, row, target);
    return true;
  }

  /**
   * Whether another node's VM may be resumed here from the object store: it
   * is suspended and published, its node takes no VMs now (draining, dead or
   * cut off), and this node runs the QEMU build and accelerator that wrote it.
   */
  private movable(row: MicroVmRow, node: { state: string; live: boolean; qemu_build: string; accelerator: string } | undefined): boolean {
    if (!this.objects || row.state !== "SUSPENDED" || !row.suspended_object) return false;
    if (node && node.live && node.state === "active") return false;
    return !node || (node.qemu_build === this.cluster!.info.qemuBuild && node.accelerator === this.cluster!.info.accelerator);
  }

  /**
   * A tenant's VMs, newest first, `limit` at a time; `nextToken` (opaque)
   * continues after the last one returned. `state` must be a MicroVM state.
   */
  async list(tenantId: string, filter: { state?: string; image?: string; limit: number; nextToken?: string }): Promise<{ items: MicroVmRow[]; nextToken?: string }> {
    let q = this.db.selectFrom("microvms").selectAll().where("tenant_id", "=", tenantId);
    if (filter.state !== undefined) {
      const state = MICROVM_STATES.find((s) => s === filter.state);
      if (!state) throw new ApiError("ValidationError", `state must be one of ${MICROVM_STATES.join(", ")}, got "${filter.state}"`, { field: "state" });
      q = q.where("state", "=", state);
    }
    if (filter.image) q = q.where((eb) => eb.or([eb("image_name", "=", filter.image!), eb("image_id", "=", filter.image!)]));
    if (filter.nextToken !== undefined) {
      const after = decodeCursor(filter.nextToken);
      q = q.where((eb) => eb.or([eb("created_at", "<", after.createdAt), eb.and([eb("created_at", "=", after.createdAt), eb("id", "<", after.id)])]));
    }
    const rows = await q.orderBy("created_at", "desc").orderBy("id", "desc").limit(filter.limit + 1).execute();
    const items = rows.slice(0, filter.limit);
    const last = items.at(-1);
    return { items, nextToken: rows.length > filter.limit && last ? encodeCursor(last) : undefined };
  }

  async events(tenantId: string, id: string): Promise<MicroVmEvent[]> {
    await this.get(tenantId, id);
    return this.db.selectFrom("events").select(["type", "message", "at"]).where("microvm_id", "=", id).orderBy("id").execute();
  }

  suspend(tenantId: string, id: string, cause = "request"): Promise<MicroVmRow> {
    return this.track(
      this.locks.run(id, async () => {
        const row = await this.getHere(tenantId, id);
        checkTransition(id, row.state, "SUSPENDING", "suspend");
        if (cause === SHUTDOWN) await this.transition(id, tenantId, "SUSPENDING");
        else {
          // The tenant's suspended VMs keep their memory on the host: counted and entered in one step.
          await serialized(this.db, `suspended-quota:${tenantId}`, async () => {
            const held = await this.db.selectFrom("microvms").select((eb) => eb.fn.countAll<number>().as("n")).where("tenant_id", "=", tenantId).where("state", "in", ["SUSPENDING", "SUSPENDED"]).executeTakeFirst();
            await checkQuota(this.db, tenantId, "suspendedMicroVms", Number(held?.n ?? 0), "suspended microVMs");
            await this.transition(id, tenantId, "SUSPENDING");
          });
        }
        const started = performance.now();
        try {
          await this.runHook(row, "suspend");
          await this.engine.suspend(id);
          this.observer?.observe("suspend", (performance.now() - started) / 1000);
        } catch (err) {
          await this.transition(id, tenantId, "RUNNING", {}, "suspend-failed", (err as Error).message);
          throw err;
        }
        const suspended = await this.transition(id, tenantId, "SUSPENDED", { suspended_at: new Date().toISOString(), suspended_node: this.cluster?.id ?? null, suspended_object: null, suspended_manifest: null }, "suspended", `suspended (${cause})`);
        // After the lock is let go, queued behind it: a resume on this node waits for the upload, and reads nothing from the store.
        if (this.objects) void this.track(this.locks.run(id, () => this.publishSuspended(tenantId, id))).catch((err: Error) => this.log(`publishing ${id}: ${err.message}`));
        return suspended;
      }),
    );
  }

  /**
   * Publishes a VM suspended on this node to the object store (its state,
   * its overlay, the layers under it; the manifest last) and records the
   * prefix in its row, conditional on it being still suspended here: then
   * any node can resume it. A failure leaves it resumable only here.
   */
  private async publishSuspended(tenantId: string, id: string): Promise<void> {
    const objects = this.objects!;
    const me = this.cluster!.owner();
    const row = await this.get(tenantId, id);
    if (row.state !== "SUSPENDED" || row.node_id !== me.nodeId || row.suspended_node !== me.nodeId || row.suspended_object) return;
    const started = performance.now();
    const { prefix, manifestSha256, bytes } = await objects.publish(id, await this.engine.suspendedFiles(id));
    const seconds = (performance.now() - started) / 1000;
    // An opted-in VM keeps it as its restore point (what a failure of its node restores), in place of the one before.
    const restorePoint = row.on_node_failure === "restore" ? { restore_object: prefix, restore_manifest: manifestSha256, restore_point_at: row.suspended_at } : {};
    const message = `published to the object store (${(bytes / 2 ** 20).toFixed(1)} MiB in ${seconds.toFixed(1)} s): resumable on any node${row.on_node_failure === "restore" ? "; kept as its restore point" : ""}`;
    const recorded = await this.db.transaction().execute(async (tx) => {
      const res = await tx
        .updateTable("microvms")
        .set({ suspended_object: prefix, suspended_manifest: manifestSha256, ...restorePoint })
        .where("id", "=", id)
        .where("state", "=", "SUSPENDED")
        .where("suspended_node", "=", me.nodeId)
        .where(ownedBy(me))
        .executeTakeFirst();
      if (res.numUpdatedRows === 0n) return false;
      await tx.insertInto("events").values(event(id, tenantId, "published", message)).execute();
      return true;
    });
    if (!recorded) await objects.remove(prefix);
    else {
      this.observer?.observe("publish", seconds);
      if (row.on_node_failure === "restore" && row.restore_object) await this.removeObject(row.restore_object);
    }
  }

  resume(tenantId: string, id: string, cause = "request"): Promise<MicroVmRow> {
    return this.track(this.locks.run(id, () => this.resumeLocked(tenantId, id, cause)));
  }

  private async resumeLocked(tenantId: string, id: string, cause: string): Promise<MicroVmRow> {
    const row = await this.getHere(tenantId, id, { resuming: true });
    checkTransition(id, row.state, "RESUMING", "resume");
    await this.admitted({ vcpus: row.vcpus, memoryMiB: row.memory_mib }, (tx) => this.transitionIn(tx, id, tenantId, "RESUMING"));
    const started = performance.now();
    try {
      // The files of its last suspend are on another node's disk: fetched from the object store.
      // (None: a VM restored after its node failed, whose files are only in the store.)
      if (this.objects && row.suspended_object && row.suspended_node !== this.cluster!.id) await this.fetchSuspended(row);
      await this.engine.resume(id);
      this.observer?.observe("resume", (performance.now() - started) / 1000);
    } catch (err) {
      await this.transition(id, tenantId, "SUSPENDED", {}, "resume-failed", (err as Error).message);
      throw err;
    }
    // Before RUNNING is recorded: requests waiting on the resume reach an app that has run its /resume hook.
    await this.runHook(row, "resume");
    const resumedAt = Date.now();
    const running = await this.transition(id, tenantId, "RUNNING", { last_activity_at: new Date(resumedAt).toISOString(), suspended_node: null, suspended_object: null, suspended_manifest: null }, "resumed", `resumed (${cause})`);
    // That write is this second's activity: the request that resumed it (runningVm) writes none of its own (touch).
    this.lastTouch.set(id, resumedAt);
    // The published suspend is stale once the VM runs again, unless it is the VM's restore point.
    if (row.suspended_object && row.suspended_object !== running.restore_object) void this.removeObject(row.suspended_object);
    return running;
  }

  /**
   * Brings a VM's published suspend onto this node: a stale local copy (from
   * an older suspend here) is dropped, the files are downloaded and checked,
   * and the engine takes them in. Its kernel and initramfs are this node's
   * (its base image's); only the state, disk and layers come from the store.
   */
  private async fetchSuspended(row: MicroVmRow): Promise<void> {
    const objects = this.objects!;
    if (this.engine.list().some((v) => v.id === row.id)) await this.engine.terminate(row.id);
    const base = await (await this.images.resolve(row.tenant_id, "base")).snapshotFor(DEFAULT_SHAPE);
    const started = performance.now();
    await this.engine.importSuspended(row.id, base, async (dir) => {
      const { meta, layers } = await objects.fetch(row, dir);
      return { layers, vcpus: row.vcpus, memoryMiB: row.memory_mib, diskBytes: meta.diskBytes, token: meta.token, guestPorts: meta.guestPorts, egress: parseEgress(JSON.parse(row.egress)) };
    });
    this.observer?.observe("fetch", (performance.now() - started) / 1000);
  }

  terminate(tenantId: string, id: string, cause = "request"): Promise<MicroVmRow> {
    return this.track(
      this.locks.run(id, async () => {
        const row = await this.getHere(tenantId, id, { claimOrphan: true });
        if (row.state === "TERMINATED") return row; // idempotent, like DELETE should be
        checkTransition(id, row.state, "TERMINATING", "terminate");
        await this.transition(id, tenantId, "TERMINATING");
        // Only a running guest can answer its /terminate hook; a suspended one is not resumed for it.
        if (row.state === "RUNNING") await this.runHook(row, "terminate");
        await this.engine.terminate(id).catch((err: Error) => {
          if (err.name !== "VmNotFoundError") throw err;
        });
        const terminated = await this.transition(
          id,
          tenantId,
          "TERMINATED",
          { terminated_at: new Date().toISOString(), suspended_node: null, suspended_object: null, suspended_manifest: null, restore_object: null, restore_manifest: null, restore_point_at: null },
          "terminated",
          `terminated (${cause})`,
        );
        for (const prefix of new Set([row.suspended_object, row.restore_object])) if (prefix) await this.removeObject(prefix);
        return terminated;
      }),
    );
  }

  /** The engine VM of a RUNNING VM (resuming it if allowed); marks activity. */
  async runningVm(tenantId: string, id: string, action: string): Promise<MicroVm> {
    // Fast path without the VM's lock, so concurrent requests to a running VM
    // do not queue behind each other; only a VM that needs resuming takes it.
    const current = await this.getHere(tenantId, id, { resuming: true });
    if (current.state === "RUNNING") {
      await this.touch(id);
      return this.engine.get(id);
    }
    return this.locks.run(id, async () => {
      let row = await this.getHere(tenantId, id, { resuming: true });
      if (row.state === "SUSPENDED" && row.auto_resume) row = await this.resumeLocked(tenantId, id, action);
      if (row.state !== "RUNNING") throw new ApiError("InvalidState", `cannot ${action} microVM ${id}: it is ${row.state}`, { state: row.state });
      await this.touch(id);
      return this.engine.get(id);
    });
  }

  /**
   * Deletes an image version (by id) or every version of a name: 409 while
   * microVMs use one (unless `force`: they are terminated first), while one
   * is building, or while another image is built on it. No new VM launches
   * from a version once its delete has begun.
   */
  async deleteImage(tenantId: string, idOrName: string, force: boolean): Promise<string[]> {
    const images = this.images.built;
    if (!images) throw new ApiError("NotFound", `image ${idOrName} not found`);
    const rows = await images.versionsToDelete(tenantId, idOrName);
    const ids = rows.map((r) => r.id);
    const users = await this.db.selectFrom("microvms").select(["id", "state"]).where("tenant_id", "=", tenantId).where("image_id", "in", ids).where("state", "!=", "TERMINATED").execute();
    const live = users.filter((u) => u.state !== "FAILED");
    if (live.length && !force) {
      throw new ApiError("Conflict", `image ${idOrName} is used by ${live.length} microVM(s) (${live.map((u) => u.id).join(", ")}); terminate them or add ?force=true`, {
        microVms: live.map((u) => u.id),
      });
    }
    await images.beginDelete(rows);
    for (const u of users) await this.terminate(tenantId, u.id, `image ${idOrName} deleted`).catch((err: Error) => this.log(`terminating ${u.id}: ${err.message}`));
    await images.finishDelete(tenantId, rows);
    return ids;
  }

  /** The managed images (catalog): launchable by every tenant and bases of builds. */
  managedImages(): ManagedImageView[] {
    return this.images.managedImages();
  }

  /** Host capacity and what live VMs (creates in flight included: PENDING) and image builds hold of it. */
  async usage(): Promise<{ vcpus: number; memoryMiB: number; usedVcpus: number; usedMemoryMiB: number }> {
    // Image builds run VMs too: their shapes count while they hold a build slot.
    const used = await liveUsage(this.db, this.images.buildsInFlight(), this.cluster?.id);
    return { ...this.capacity, usedVcpus: used.vcpus, usedMemoryMiB: used.memoryMiB };
  }

  async countByState(): Promise<Record<string, number>> {
    const rows = await this.mine(this.db.selectFrom("microvms").select(["state", (eb) => eb.fn.countAll<number>().as("n")])).groupBy("state").execute();
    return Object.fromEntries(rows.map((r) => [r.state, Number(r.n)]));
  }

  /**
   * The VM's record and its engine handle while the engine has it (not after
   * terminate); neither resumes it nor counts as activity (metrics, logs).
   */
  async peek(tenantId: string, id: string): Promise<{ row: MicroVmRow; vm?: MicroVm }> {
    const row = await this.getHere(tenantId, id);
    return { row, vm: this.engine.list().find((v) => v.id === id) };
  }

  /**
   * Records activity (exec, files, terminal input, endpoint traffic) for the
   * idle policy. Written at most once a second per VM: the policy counts in
   * seconds, and a durable write per proxied request would dominate its cost.
   */
  async touch(id: string): Promise<void> {
    const now = Date.now();
    if (now - (this.lastTouch.get(id) ?? 0) < 1000) return;
    this.lastTouch.set(id, now);
    await this.db.updateTable("microvms").set({ last_activity_at: new Date(now).toISOString() }).where("id", "=", id).execute();
  }

  /**
   * Runs `enter` (the write that takes host room: a PENDING row, a RESUMING
   * state) only if the host can take `shape` on top of live VMs and creates in
   * flight, in one critical section with that check; 503 otherwise. On a
   * cluster the section is the node's row lock (ClusterNode.admit).
   */
  private async admitted(shape: { vcpus: number; memoryMiB: number }, enter: (tx: Tx) => Promise<unknown>): Promise<void> {
    if (this.cluster) {
      await this.cluster.admit(shape, this.images.buildsInFlight(), enter);
      return;
    }
    await this.locks.run("admission", async () => {
      await this.admit(shape);
      await this.db.transaction().execute(enter);
    });
  }

  /**
   * A snapshot or fork of a VM with volumes is refused (409 naming them): its
   * memory has them mounted, and a copy would share a read-write volume or
   * find it gone. Detach by terminating, or snapshot a VM without volumes.
   */
  private async refuseWithVolumes(id: string, action: string): Promise<void> {
    const attached = await this.volumes.ofMicroVm(id);
    if (attached.length === 0) return;
    const names = attached.map((v) => `${v.name} at ${v.path}${v.readOnly ? " (read-only)" : ""}`).join(", ");
    throw new ApiError("Conflict", `cannot ${action} microVM ${id}: it has volumes attached (${names}), which a copy would share`, { volumes: attached.map((v) => v.name) });
  }

  /** Refuses with 503 if the host cannot take `shape` on top of live VMs and creates in flight (decideAdmission). */
  private async admit(shape: { vcpus: number; memoryMiB: number }): Promise<void> {
    const decision = decideAdmission(shape, await this.hostUsage(), this.capacity);
    if (!decision.admitted) {
      throw new ApiError("CapacityExceeded", decision.message, { resource: decision.resource, used: decision.used, capacity: decision.capacity });
    }
  }

  /** What live VMs and builds commit, and, with real limits, what their QEMUs hold now (private memory) and the host's MemAvailable. */
  private async hostUsage(): Promise<HostUsage> {
    const u = await this.usage();
    if (!this.capacity.real) return { vcpus: u.usedVcpus, memoryMiB: u.usedMemoryMiB };
    const live = await this.db.selectFrom("microvms").select(["id", "state"]).where("state", "not in", ["TERMINATED", "FAILED", "SUSPENDED"]).execute();
    const pids = new Map(this.engine.list().map((vm) => [vm.id, vm.status === "running" ? vm.record.pid : undefined]));
    // Warm-pool VMs are in the VMs' cgroup too: unanswered, a pool grown by a burst let admission overfill it.
    const vmPids = [...live.filter((r) => holdsHostResources(r.state)).map((r) => pids.get(r.id)), ...this.engine.pooledPids()];
    const vmPrivateMiB = await Promise.all(vmPids.map((pid) => (pid === undefined ? undefined : privateMemoryMiB(pid))));
    return { vcpus: u.usedVcpus, memoryMiB: u.usedMemoryMiB, real: { memAvailableMiB: await memAvailableMiB(), vmPrivateMiB, vmsMappedFileMiB: await this.engine.vmsMappedFileMiB(), buildsMiB: this.images.buildsInFlight().memoryMiB } };
  }

  /** Idle suspend, termination after a long suspension and max runtime, checked once per interval. */
  private async applyPolicies(): Promise<void> {
    if (this.objects) await this.dropMoved().catch((err: Error) => this.log(`dropping moved microVMs: ${err.message}`));
    if (this.objects) await this.resumeRestored().catch((err: Error) => this.log(`resuming restored microVMs: ${err.message}`));
    const now = Date.now();
    const rows = await this.mine(this.db.selectFrom("microvms").selectAll().where("state", "in", ["RUNNING", "SUSPENDED"])).execute();
    for (const row of rows) {
      try {
        if (Date.parse(row.expires_at) <= now) {
          await this.terminate(row.tenant_id, row.id, `max runtime of ${row.max_runtime_seconds} s reached`);
        } else if (row.state === "RUNNING" && row.suspend_after_seconds > 0 && Date.parse(row.last_activity_at) + row.suspend_after_seconds * 1000 <= now) {
          await this.suspend(row.tenant_id, row.id, `idle for ${row.suspend_after_seconds} s`);
        } else if (
          row.state === "SUSPENDED" &&
          row.terminate_after_suspended_seconds > 0 &&
          row.suspended_at &&
          Date.parse(row.suspended_at) + row.terminate_after_suspended_seconds * 1000 <= now
        ) {
          await this.terminate(row.tenant_id, row.id, `suspended for ${row.terminate_after_suspended_seconds} s`);
        }
      } catch (err) {
        if (err instanceof ApiError && err.code === "QuotaExceeded") await this.noteQuota(row, err.message);
        else if (!(err instanceof ApiError && err.code === "InvalidState")) this.log(`policy on ${row.id}: ${(err as Error).message}`);
      }
    }
  }

  /** Removes a published suspend or restore point from the object store; a failure is logged (the object stays until the bucket's sweep). */
  private async removeObject(prefix: string): Promise<void> {
    await this.objects?.remove(prefix).catch((err: Error) => this.log(`removing ${prefix}: ${err.message}`));
  }

  /**
   * Resumes the VMs restored after their node failed (SUSPENDED at their
   * restore point, no node's) for which this node is the one every node
   * picks (ClusterNode.moveTarget): a VM that opted in runs again without
   * waiting for a request. The hand-over in resume() lets one node win; with no
   * room anywhere, it waits for its next request (auto-resume).
   */
  private async resumeRestored(): Promise<void> {
    const restored = await this.db
      .selectFrom("microvms")
      .select(["id", "tenant_id", "vcpus", "memory_mib"])
      .where("state", "=", "SUSPENDED")
      .where("node_id", "is", null)
      .where("on_node_failure", "=", "restore")
      .where("suspended_object", "is not", null)
      .execute();
    for (const vm of restored) {
      if (this.restoring.has(vm.id)) continue;
      const target = await this.cluster!.moveTarget({ vcpus: vm.vcpus, memoryMiB: vm.memory_mib });
      if (target?.id !== this.cluster!.id) continue;
      // Not awaited: the other policies go on meanwhile; the next rounds skip it.
      this.restoring.add(vm.id);
      void this.resume(vm.tenant_id, vm.id, "restored after its node failed")
        .catch((err: Error) => this.log(`resuming ${vm.id}, restored after its node failed: ${err.message}`))
        .finally(() => this.restoring.delete(vm.id));
    }
  }

  /**
   * Ends this node's local copies of suspended VMs another node has taken
   * (resumed there from the object store): the row is no longer this node's
   * to write, and the copy is older than whatever the VM is now.
   */
  private async dropMoved(): Promise<void> {
    const suspended = this.engine.list().filter((vm) => vm.status === "suspended").map((vm) => vm.id);
    if (suspended.length === 0) return;
    const moved = await this.db.selectFrom("microvms").select("id").where("id", "in", suspended).where((eb) => eb.or([eb("node_id", "is", null), eb("node_id", "!=", this.cluster!.id)])).execute();
    for (const { id } of moved) {
      // Under the VM's lock: not while this node works on it.
      await this.locks.run(id, async () => {
        const row = await this.db.selectFrom("microvms").select("node_id").where("id", "=", id).executeTakeFirst();
        if (row?.node_id !== this.cluster!.id && this.engine.list().some((v) => v.id === id)) {
          await this.engine.terminate(id);
          this.log(`dropped the local copy of ${id}: it moved to node ${row?.node_id ?? "(none)"}`);
        }
      });
    }
  }

  /** An idle suspend the tenant's quota refused: said once per VM as an event (the VM runs on), not every second. */
  private async noteQuota(row: MicroVmRow, message: string): Promise<void> {
    const last = await this.db.selectFrom("events").select("type").where("microvm_id", "=", row.id).orderBy("id", "desc").executeTakeFirst();
    if (last?.type === "suspend-refused") return;
    await this.db.insertInto("events").values(event(row.id, row.tenant_id, "suspend-refused", `idle suspend refused: ${message}`)).execute();
  }

  /**
   * Calls one lifecycle hook of the VM's image, if enabled and the engine has
   * the VM, and records its outcome as an event; the app's failure never throws.
   */
  private async runHook(row: MicroVmRow, name: HookName, body?: Buffer): Promise<void> {
    const hooks = row.hooks ? (JSON.parse(row.hooks) as ImageHooks) : undefined;
    const vm = this.engine.list().find((v) => v.id === row.id);
    if (!vm) return;
    const outcome = await callHook(vm.agent, hooks, name, body);
    if (outcome) await this.db.insertInto("events").values(event(row.id, row.tenant_id, outcome.ok ? "hook" : "hook-failed", outcome.message)).execute();
  }

  private async onEngineExit(id: string, reason: string): Promise<void> {
    const row = await this.db.selectFrom("microvms").selectAll().where("id", "=", id).executeTakeFirst();
    if (!row || row.state === "TERMINATED" || row.state === "FAILED") return;
    await this.transition(id, row.tenant_id, "FAILED", { state_reason: reason }, "failed", reason).catch((err: Error) => this.log(`recording ${id} failed: ${err.message}`));
  }

  /**
   * The only writer of the state column: enters `to` (with `update`, and an
   * event if `eventType` is given) in one transaction, and only from a state
   * that `to` may follow; otherwise nothing changes and InvalidState (409)
   * names the state the VM is in.
   */
  private async transition(id: string, tenantId: string, to: MicroVmState, update: Omit<MicroVmUpdate, "state"> = {}, eventType?: string, message = ""): Promise<MicroVmRow> {
    return this.db.transaction().execute((tx) => this.transitionIn(tx, id, tenantId, to, update, eventType, message));
  }

  /**
   * transition() within `tx`. On a cluster the write is also conditional on
   * this node owning the VM at its epoch with a live lease: a node its peers
   * declared dead (frozen, cut off) changes nothing.
   */
  private async transitionIn(tx: Tx, id: string, tenantId: string, to: MicroVmState, update: Omit<MicroVmUpdate, "state"> = {}, eventType?: string, message = ""): Promise<MicroVmRow> {
    const owner = this.cluster?.owner();
    const row = await tx
      .updateTable("microvms")
      .set({ ...update, state: to })
      .where("id", "=", id)
      .where("state", "in", statesBefore(to))
      .$if(owner !== undefined, (qb) => qb.where(ownedBy(owner!)))
      .returningAll()
      .executeTakeFirst();
    if (!row) {
      const current = await tx.selectFrom("microvms").select(["state", "node_id"]).where("id", "=", id).executeTakeFirst();
      if (!current) throw new ApiError("NotFound", `microVM ${id} not found`);
      if (owner && canTransition(current.state, to)) {
        throw new ApiError("Conflict", `microVM ${id} is no longer this node's to change (node ${owner.nodeId}, epoch ${owner.epoch}): its lease was lost`, { node: owner.nodeId });
      }
      throw invalidState(id, current.state, `move to ${to}:`);
    }
    if (eventType) await tx.insertInto("events").values(event(id, tenantId, eventType, message)).execute();
    return row;
  }

  /** Narrows a query of microvms to this node's VMs on a cluster (every VM on a single host). */
  private mine<QB extends { where: (column: "node_id", op: "=", value: string) => QB }>(qb: QB): QB {
    return this.cluster ? qb.where("node_id", "=", this.cluster.id) : qb;
  }

  /** Fencing (ClusterNode): the node lost its lease, so its running guests are ended; suspended ones stay on disk, still its own. */
  async endRunningVms(): Promise<void> {
    for (const vm of this.engine.list()) {
      if (vm.status !== "suspended") await this.engine.terminate(vm.id).catch((err: Error) => this.log(`fencing: ending ${vm.id}: ${err.message}`));
    }
  }
}

/** A VM's endpoint token (docs/api.md, Endpoints): its own for every VM, forks included. */
function newEndpointToken(): string {
  return `et_${randomBytes(24).toString("base64url")}`;
}

/** Runs `fn` holding every key's lock (taken in order; the keys are new VMs' ids, which nothing else holds). */
function underLocks<T>(locks: KeyedMutex, keys: string[], fn: () => Promise<T>): Promise<T> {
  const [first, ...rest] = keys;
  return first === undefined ? fn() : locks.run(first, () => underLocks(locks, rest, fn));
}

/** The cause of the suspends a graceful server shutdown makes. */
const SHUTDOWN = "server shutdown";

function event(microvmId: string, tenantId: string, type: string, message: string) {
  return { microvm_id: microvmId, tenant_id: tenantId, type, message, at: new Date().toISOString() };
}

function checkRange(field: keyof typeof LIMITS, value: number, name: string = field): void {
  checkIntRange(name, value, LIMITS[field]);
}

/** List cursors: the last item's creation time and id, opaque to clients. */
function encodeCursor(row: Pick<MicroVmRow, "created_at" | "id">): string {
  return Buffer.from(`${row.created_at}|${row.id}`).toString("base64url");
}

function decodeCursor(token: string): { createdAt: string; id: string } {
  const [createdAt, id] = Buffer.from(token, "base64url").toString("utf8").split("|");
  if (!createdAt || !id || Number.isNaN(Date.parse(createdAt))) throw new ApiError("ValidationError", "nextToken is not a token this server returned", { field: "nextToken" });
  return { createdAt, id };
}
