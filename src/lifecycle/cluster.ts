import { sql, type Expression, type ExpressionBuilder, type SqlBool, type Transaction } from "kysely";
import { ApiError } from "../errors.ts";
import type { Db } from "../store/db.ts";
import type { Database, MicroVmRow, NodeRow } from "../store/schema.ts";
import { decideNodeFailure, holdsHostResources, statesBefore, type MicroVmState } from "./states.ts";

/** What a node is: where its peers reach it, and what a VM or snapshot needs of the host that runs it. */
export interface NodeInfo {
  id: string;
  /** The internal URL its peers reach it at (COCOON_NODE_URL). */
  url: string;
  /** `qemuBuild()`: snapshots move only between identical builds. */
  qemuBuild: string;
  accelerator: string;
  cpuSignature: string;
  /** Capacity for live VMs (hostCapacity). */
  vcpus: number;
  memoryMiB: number;
}

/** The node that may write a VM's state, at the epoch of its registration. */
export interface VmOwner {
  nodeId: string;
  epoch: number;
}

export interface LeaseTiming {
  /** A lease not renewed for this long is expired and any node reaps it. */
  leaseSeconds: number;
  /** How often a node renews its lease and reaps expired ones. */
  renewEveryMs: number;
}

/** Renewal every 3 s, a lease of 15 s: a dead node is reaped within ~18 s. */
export const DEFAULT_LEASE: LeaseTiming = { leaseSeconds: 15, renewEveryMs: 3000 };

export type Tx = Transaction<Database>;

/**
 * What keeps a node's QEMUs from outliving its lease (the lease fence,
 * lease-fence.ts): told of every lease that took, checked before each renewal.
 */
export interface LeaseGuard {
  /** The guard runs (started again if it died); throws when it cannot be. */
  ensure(): Promise<void>;
  /** The lease holds `leaseSeconds` past `sentAtNs` (CLOCK_MONOTONIC, taken before its write was sent). */
  renewed(sentAtNs: bigint, leaseSeconds: number): Promise<void>;
}

/** Node `nodeId` is at `epoch` with its lease live on the database's clock: not dead, or (`takingVms`) active. */
function nodeLiveAt(eb: ExpressionBuilder<Database, "microvms">, nodeId: string, epoch: number, opts: { takingVms?: boolean } = {}): Expression<SqlBool> {
  return eb.exists(
    eb
      .selectFrom("nodes")
      .select("nodes.id")
      .where("nodes.id", "=", nodeId)
      .where("nodes.epoch", "=", epoch)
      .where("nodes.state", opts.takingVms ? "=" : "!=", opts.takingVms ? "active" : "dead")
      .where("nodes.lease_expires_at", ">", sql<Date>`now()`),
  );
}

/** A VM's row is this node's at this epoch, and the node's lease is live on the database's clock. */
export function ownedBy(owner: VmOwner) {
  return (eb: ExpressionBuilder<Database, "microvms">): Expression<SqlBool> =>
    eb.and([eb("microvms.node_id", "=", owner.nodeId), eb("microvms.node_epoch", "=", owner.epoch), nodeLiveAt(eb, owner.nodeId, owner.epoch)]);
}

/**
 * This server's membership of a cluster (docs/cluster.md): a row in `nodes`
 * with a lease on the database's clock, renewed every few seconds. Every
 * coordination is a row, a row lock or a lease in PostgreSQL; there is no
 * membership protocol of its own.
 *
 * - Register: the node's epoch is raised, so whatever an earlier life of the
 *   node still tries to write (a frozen process that wakes up) matches nothing.
 * - Renew: conditional on the epoch, a state other than dead, and a lease not
 *   yet expired. A renewal that updates nothing means the node was declared
 *   dead: it fences itself (`onFenced` ends its VMs) and registers again.
 * - Reap: any node marks expired leases dead and fails the live VMs they
 *   owned, in one transaction; suspended VMs stay the node's (their state is
 *   on its disk) and are served again when it comes back.
 */
export class ClusterNode {
  private epoch = 0;
  private timer: NodeJS.Timeout | undefined;
  private ticking: Promise<void> | undefined;
  private readonly timing: LeaseTiming;

  constructor(
    private readonly db: Db,
    readonly info: NodeInfo,
    private readonly opts: {
      /** Ends every VM of this node's engine: its rows are no longer its own. */
      onFenced: () => Promise<void>;
      /** What this node's image builds hold now (published with each renewal, for peers placing VMs). */
      builds?: () => { vcpus: number; memoryMiB: number };
      log?: (line: string) => void;
      timing?: LeaseTiming;
      /** Cluster servers: the lease fence. Without one (tests of the protocol alone), a node's QEMUs may outlive its lease. */
      guard?: LeaseGuard;
    },
  ) {
    this.timing = opts.timing ?? DEFAULT_LEASE;
  }

  get id(): string {
    return this.info.id;
  }

  owner(): VmOwner {
    if (this.epoch === 0) throw new Error("cluster node used before register()");
    return { nodeId: this.info.id, epoch: this.epoch };
  }

  /**
   * Joins (or rejoins) the cluster with a new epoch. A previous life of this
   * node whose lease is still live (a quick restart) hands its VMs over to the
   * new epoch; one whose lease expired first has its live VMs failed (as a
   * reap would), and keeps only its suspended ones.
   */
  async register(): Promise<void> {
    const { info } = this;
    const lease = this.leaseExpiry();
    const sentAt = process.hrtime.bigint();
    this.epoch = await this.db.transaction().execute(async (tx) => {
      const previous = await tx.selectFrom("nodes").selectAll().where("id", "=", info.id).forUpdate().executeTakeFirst();
      const values = {
        url: info.url,
        state: "active" as const,
        state_reason: null,
        qemu_build: info.qemuBuild,
        accelerator: info.accelerator,
        cpu_signature: info.cpuSignature,
        vcpus: info.vcpus,
        memory_mib: info.memoryMiB,
        lease_expires_at: lease,
      };
      if (!previous) {
        await tx.insertInto("nodes").values({ id: info.id, epoch: 1, registered_at: sql<Date>`now()`, ...values }).execute();
        return 1;
      }
      const live = await tx.selectFrom("nodes").select("id").where("id", "=", info.id).where("state", "!=", "dead").where("lease_expires_at", ">", sql<Date>`now()`).executeTakeFirst();
      // Its lease expired: its fence ended its QEMUs first, so opted-in VMs may be restored elsewhere.
      if (!live) await failLiveVms(tx, [previous], `node ${info.id} stopped renewing its lease`, { restore: true });
      const epoch = previous.epoch + 1;
      await tx.updateTable("nodes").set({ ...values, epoch, registered_at: sql<Date>`now()` }).where("id", "=", info.id).execute();
      await tx.updateTable("microvms").set({ node_epoch: epoch }).where("node_id", "=", info.id).where("state", "not in", ["TERMINATED", "FAILED"]).execute();
      return epoch;
    });
    // The deadline first: a fence started now finds the lease it guards.
    await this.opts.guard?.renewed(sentAt, this.timing.leaseSeconds);
    await this.opts.guard?.ensure();
    this.opts.log?.(`cluster: node ${info.id} registered at epoch ${this.epoch} (${info.url})`);
  }

  /** Registers, then renews and reaps every `renewEveryMs` until stop(). */
  async start(): Promise<void> {
    await this.register();
    this.timer = setInterval(() => {
      // One tick at a time: a slow database must not pile renewals up.
      if (this.ticking) return;
      this.ticking = this.tick().finally(() => (this.ticking = undefined));
    }, this.timing.renewEveryMs);
  }

  /** Stops renewing (the lease then runs out): tests, and leave(). */
  async stop(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    await this.ticking;
  }

  private async tick(): Promise<void> {
    try {
      await this.opts.guard?.ensure();
    } catch (err) {
      // Renewing without the fence would let this node's guests outlive its lease: it lets the lease lapse instead.
      this.opts.log?.(`cluster: the lease fence is not running and cannot be started (${(err as Error).message}): ending this node's VMs and renewing no more until it runs`);
      await this.opts.onFenced().catch(() => undefined);
      return;
    }
    try {
      if (!(await this.renew())) await this.fence();
      await this.reap();
    } catch (err) {
      // The database unreachable: the lease runs out unless a later tick renews it.
      this.opts.log?.(`cluster: lease renewal failed: ${(err as Error).message}`);
    }
  }

  /** Extends the lease; false when it updates nothing (the node was declared dead, or its lease ran out). */
  async renew(): Promise<boolean> {
    const builds = this.opts.builds?.() ?? { vcpus: 0, memoryMiB: 0 };
    const sentAt = process.hrtime.bigint();
    const res = await this.db
      .updateTable("nodes")
      .set({ lease_expires_at: this.leaseExpiry(), build_vcpus: builds.vcpus, build_memory_mib: builds.memoryMiB })
      .where("id", "=", this.info.id)
      .where("epoch", "=", this.epoch)
      .where("state", "!=", "dead")
      .where("lease_expires_at", ">", sql<Date>`now()`)
      .executeTakeFirst();
    if (res.numUpdatedRows === 0n) return false;
    await this.opts.guard?.renewed(sentAt, this.timing.leaseSeconds);
    return true;
  }

  /** Declared dead by its peers: ends its VMs (others may act on their rows now), then rejoins under a new epoch. */
  async fence(): Promise<void> {
    this.opts.log?.(`cluster: node ${this.info.id} lost its lease at epoch ${this.epoch}: ending its VMs and registering again`);
    await this.opts.onFenced();
    await this.register();
  }

  /** Marks every expired lease dead and fails the live VMs of those nodes, atomically; returns the nodes reaped. */
  async reap(): Promise<string[]> {
    return this.db.transaction().execute(async (tx) => {
      const dead = await tx
        .updateTable("nodes")
        .set({ state: "dead", state_reason: "its lease expired" })
        .where("state", "!=", "dead")
        .where("lease_expires_at", "<=", sql<Date>`now()`)
        .returningAll()
        .execute();
      for (const node of dead) await failLiveVms(tx, [node], `node ${node.id} stopped renewing its lease`, { restore: true });
      if (dead.length > 0) this.opts.log?.(`cluster: reaped ${dead.map((n) => n.id).join(", ")}`);
      return dead.map((n) => n.id);
    });
  }

  /** A graceful stop (its VMs suspended): declared dead now rather than when its lease runs out; live VMs left are failed. */
  async leave(): Promise<void> {
    await this.stop();
    await this.db.transaction().execute(async (tx) => {
      const left = await tx.updateTable("nodes").set({ state: "dead", state_reason: "stopped" }).where("id", "=", this.info.id).where("epoch", "=", this.epoch).returningAll().execute();
      // Its QEMUs may still run (its fence ends them after this): failed, never restored elsewhere.
      await failLiveVms(tx, left, `node ${this.info.id} stopped`, { restore: false });
    });
  }


  /**
   * Admission on this node: locks its row (admissions on it queue there,
   * whichever server makes them), re-checks that it is active and has room
   * for `shape` beside its live VMs and `builds`, and runs `enter` (the
   * insert that takes the room) in the same transaction. CapacityExceeded
   * (503) when it has no room or takes no new VMs.
   */
  async admit<T>(shape: { vcpus: number; memoryMiB: number }, builds: { vcpus: number; memoryMiB: number }, enter: (tx: Tx, owner: VmOwner) => Promise<T>): Promise<T> {
    const owner = this.owner();
    return this.db.transaction().execute(async (tx) => {
      const node = await tx.selectFrom("nodes").selectAll().where("id", "=", owner.nodeId).where("epoch", "=", owner.epoch).forUpdate().executeTakeFirst();
      if (!node || node.state !== "active") {
        throw new ApiError("CapacityExceeded", `node ${owner.nodeId} takes no new microVMs: it is ${node?.state ?? "fenced"}`, { node: owner.nodeId, state: node?.state ?? "fenced" });
      }
      const used = await liveUsage(tx, builds, owner.nodeId);
      const capacity = { vcpus: node.vcpus, memoryMiB: node.memory_mib };
      for (const key of ["vcpus", "memoryMiB"] as const) {
        if (used[key] + shape[key] > capacity[key]) {
          throw new ApiError("CapacityExceeded", `node ${owner.nodeId} is at capacity: ${used[key]} of ${capacity[key]} ${key} in use, ${shape[key]} more requested`, {
            resource: key,
            used: used[key],
            capacity: capacity[key],
          });
        }
      }
      return enter(tx, owner);
    });
  }

  /**
   * Live, active peers that could run a VM of `shape` (the same QEMU build
   * and accelerator) and have room for it as the database sees them now,
   * roomiest first: where a create this node has no room for is offered.
   * Each re-checks under its own row lock (admit).
   */
  async peersWithRoom(shape: { vcpus: number; memoryMiB: number }): Promise<string[]> {
    return (await this.nodesWithRoom(shape, { withSelf: false })).map((p) => p.url);
  }

  /**
   * Where a suspended VM of `shape` that leaves its node (draining, dead) is
   * resumed: of the live, active nodes of this QEMU build and accelerator
   * with room, this one included, the roomiest, the lowest id on a tie.
   * Every node picks the same one while usage stands still, so concurrent
   * requests through any nodes meet on one node, whose per-VM lock lets one
   * of them claim the VM and the rest wait for it. Undefined when none has room.
   */
  async moveTarget(shape: { vcpus: number; memoryMiB: number }): Promise<{ id: string; url: string; epoch: number } | undefined> {
    return (await this.nodesWithRoom(shape, { withSelf: true }))[0];
  }

  private async nodesWithRoom(shape: { vcpus: number; memoryMiB: number }, opts: { withSelf: boolean }): Promise<{ id: string; url: string; epoch: number }[]> {
    const nodes = await this.db
      .selectFrom("nodes")
      .selectAll()
      .$if(!opts.withSelf, (qb) => qb.where("id", "!=", this.info.id))
      .where("state", "=", "active")
      .where("lease_expires_at", ">", sql<Date>`now()`)
      .where("qemu_build", "=", this.info.qemuBuild)
      .where("accelerator", "=", this.info.accelerator)
      .execute();
    const withRoom: { id: string; url: string; epoch: number; freeMiB: number }[] = [];
    for (const node of nodes) {
      const used = await liveUsage(this.db, { vcpus: node.build_vcpus, memoryMiB: node.build_memory_mib }, node.id);
      if (used.vcpus + shape.vcpus <= node.vcpus && used.memoryMiB + shape.memoryMiB <= node.memory_mib) withRoom.push({ id: node.id, url: node.url, epoch: node.epoch, freeMiB: node.memory_mib - used.memoryMiB });
    }
    return withRoom.sort((a, b) => b.freeMiB - a.freeMiB || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0)).map(({ id, url, epoch }) => ({ id, url, epoch }));
  }

  private leaseExpiry() {
    return sql<Date>`now() + make_interval(secs => ${this.timing.leaseSeconds})`;
  }
}

/**
 * What live VMs (creates in flight included: PENDING) and `builds` (image
 * builds run VMs too) hold of a host's capacity: of node `nodeId` on a
 * cluster, of the one host otherwise.
 */
export async function liveUsage(db: Db | Tx, builds: { vcpus: number; memoryMiB: number }, nodeId?: string): Promise<{ vcpus: number; memoryMiB: number }> {
  const rows = await db
    .selectFrom("microvms")
    .select(["state", "vcpus", "memory_mib"])
    .where("state", "not in", ["TERMINATED", "FAILED", "SUSPENDED"])
    .$if(nodeId !== undefined, (qb) => qb.where("node_id", "=", nodeId!))
    .execute();
  const used = { ...builds };
  for (const r of rows) {
    if (!holdsHostResources(r.state)) continue;
    used.vcpus += r.vcpus;
    used.memoryMiB += r.memory_mib;
  }
  return used;
}

/**
 * Draining: node `nodeId` takes no new VMs (its VMs run on and are served);
 * `active` again when `draining` is false. Any node (an operator's call) may
 * set it; a dead node stays dead. Undefined when there is no such live node.
 */
export async function setNodeDraining(db: Db, nodeId: string, draining: boolean): Promise<NodeRow | undefined> {
  return db
    .updateTable("nodes")
    .set({ state: draining ? "draining" : "active" })
    .where("id", "=", nodeId)
    .where("state", "!=", "dead")
    .returningAll()
    .executeTakeFirst();
}

/**
 * This node cannot make the VM (no room, or its image is another node's) and
 * `peers` (URLs, best first) may: the router offers them the create. `why` is
 * the answer when none takes it.
 */
export class TryPeersError extends ApiError {
  constructor(
    why: ApiError,
    readonly peers: string[],
  ) {
    super(why.code, why.message, why.details);
  }
}

/** The URL of node `nodeId` while its lease is live and it takes VMs. */
export async function activeNodeUrl(db: Db, nodeId: string): Promise<string | undefined> {
  const node = await db.selectFrom("nodes").select("url").where("id", "=", nodeId).where("state", "=", "active").where("lease_expires_at", ">", sql<Date>`now()`).executeTakeFirst();
  return node?.url;
}

/** The nodes of the cluster with their leases as the database sees them (metrics, tests, operators). */
export async function listNodes(db: Db): Promise<(NodeRow & { lease_live: boolean })[]> {
  return db
    .selectFrom("nodes")
    .selectAll()
    .select(sql<boolean>`state != 'dead' and lease_expires_at > now()`.as("lease_live"))
    .orderBy("id")
    .execute();
}

/**
 * The live VMs of dead nodes (`reason`: why they died): each is FAILED or,
 * with `restore` (a lease that expired: the node's fence ended its QEMUs
 * before), restored from its restore point when it opted in
 * (decideNodeFailure): SUSPENDED at its last published suspend, owned by
 * no node, which any node may resume (the one every node picks resumes it
 * at once: MicroVmService's policy loop). An event each. Suspended VMs keep
 * their state (on the node's disk, or published).
 */
async function failLiveVms(tx: Tx, nodes: NodeRow[], reason: string, opts: { restore: boolean }): Promise<void> {
  const live: MicroVmState[] = ["PENDING", "RUNNING", "SUSPENDING", "RESUMING", "TERMINATING"];
  for (const node of nodes) {
    const vms = await tx
      .selectFrom("microvms")
      .select(["id", "tenant_id", "state", "on_node_failure", "restore_object", "restore_manifest", "restore_point_at"])
      .where("node_id", "=", node.id)
      .where("node_epoch", "=", node.epoch)
      .where("state", "in", live)
      .execute();
    const at = new Date().toISOString();
    for (const vm of vms) {
      const restorable = opts.restore && vm.restore_object !== null && vm.restore_manifest !== null;
      const outcome = decideNodeFailure({ state: vm.state, onNodeFailure: vm.on_node_failure, restorePointAt: restorable ? vm.restore_point_at : null }, reason);
      if (!outcome) continue;
      const write = tx.updateTable("microvms").where("id", "=", vm.id).where("node_id", "=", node.id).where("node_epoch", "=", node.epoch).where("state", "=", vm.state);
      if (outcome.action === "fail") {
        if (!statesBefore("FAILED").includes(vm.state)) continue;
        const res = await write.set({ state: "FAILED", state_reason: outcome.reason }).executeTakeFirst();
        if (res.numUpdatedRows > 0n) await tx.insertInto("events").values({ microvm_id: vm.id, tenant_id: vm.tenant_id, type: "failed", message: outcome.reason, at }).execute();
      } else {
        const res = await write
          .set({
            state: "SUSPENDED",
            state_reason: outcome.message,
            node_id: null,
            node_epoch: null,
            suspended_node: null,
            suspended_object: vm.restore_object,
            suspended_manifest: vm.restore_manifest,
            suspended_at: vm.restore_point_at,
          })
          .executeTakeFirst();
        if (res.numUpdatedRows > 0n) await tx.insertInto("events").values({ microvm_id: vm.id, tenant_id: vm.tenant_id, type: "restored", message: outcome.message, at }).execute();
      }
    }
  }
}

/**
 * Hands a suspended, published VM whose node takes no VMs (draining, dead)
 * to node `target`, the one every node picks for it (moveTarget), with one
 * conditional update: the VM as it was read (suspended, on the same node
 * and epoch, the same published suspend) becomes `target`'s at its epoch,
 * while `target` is live and active; still SUSPENDED, it is resumed there
 * (from the object store) by the request that follows. Whichever nodes
 * hand it over at once, and to whichever targets, one update matches: the
 * others find the VM on the winner and forward their requests there. The
 * VM as handed over, or undefined when the row had changed.
 */
export async function handOverSuspended(db: Db, row: MicroVmRow, target: { id: string; epoch: number }): Promise<MicroVmRow | undefined> {
  return db.transaction().execute(async (tx) => {
    const moved = await tx
      .updateTable("microvms")
      .set({ node_id: target.id, node_epoch: target.epoch })
      .where("id", "=", row.id)
      .where("state", "=", "SUSPENDED")
      .where("node_id", row.node_id === null ? "is" : "=", row.node_id)
      .where("node_epoch", row.node_epoch === null ? "is" : "=", row.node_epoch)
      .where("suspended_object", "=", row.suspended_object)
      .where((eb) => nodeLiveAt(eb, target.id, target.epoch, { takingVms: true }))
      .returningAll()
      .executeTakeFirst();
    if (moved) {
      const message = `handed to node ${target.id} from node ${row.node_id ?? "(none)"} to resume from the object store`;
      await tx.insertInto("events").values({ microvm_id: row.id, tenant_id: row.tenant_id, type: "moved", message, at: new Date().toISOString() }).execute();
    }
    return moved;
  });
}
