import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ClusterNode, handOverSuspended, listNodes, ownedBy, setNodeDraining, type NodeInfo, type VmOwner } from "../../src/lifecycle/cluster.ts";
import { closeDatabase, openPostgres, type Db } from "../../src/store/db.ts";
import type { MicroVmRow, MicroVmState } from "../../src/store/schema.ts";
import { startPostgres, type TestPostgres } from "../support/postgres.ts";

/*
 * Node membership on a real PostgreSQL: leases on the database's clock,
 * reaping, fencing by epoch, and admission under the node's row lock. Each
 * "server" has its own connection pool, as separate processes would.
 */
let postgres: TestPostgres;
const open: Db[] = [];
beforeAll(async () => {
  postgres = await startPostgres();
});
afterAll(async () => {
  await Promise.all(open.map(closeDatabase));
  await postgres?.stop();
});

async function database(servers: number): Promise<Db[]> {
  const url = await postgres.newDatabase();
  const dbs = [await openPostgres(url)];
  for (let i = 1; i < servers; i++) dbs.push(await openPostgres(url));
  open.push(...dbs);
  await dbs[0]!.insertInto("tenants").values({ id: "tnt-1", name: "acme", created_at: new Date().toISOString() }).execute();
  return dbs;
}

const SHORT = { leaseSeconds: 1, renewEveryMs: 200 };
/** For cases about something else than expiry: no lease runs out during them. */
const LONG = { leaseSeconds: 60, renewEveryMs: 1000 };

function info(id: string, capacity = { vcpus: 4, memoryMiB: 4096 }): NodeInfo {
  return { id, url: `http://127.0.0.1:0/${id}`, qemuBuild: "qemu-7.2", accelerator: "tcg", cpuSignature: "test", ...capacity };
}

function node(db: Db, id: string, fenced: string[] = [], capacity?: { vcpus: number; memoryMiB: number }): ClusterNode {
  return new ClusterNode(db, info(id, capacity), { onFenced: async () => void fenced.push(id), timing: SHORT });
}

let vmCount = 0;
function vmRow(owner: VmOwner, state: MicroVmState, vcpus = 1): MicroVmRow {
  const now = new Date().toISOString();
  return {
    id: `vm-${++vmCount}`, tenant_id: "tnt-1", image_name: "base", image_id: "base", state, state_reason: null, vcpus, memory_mib: 256, disk_gib: 2, env: "{}",
    suspend_after_seconds: 0, auto_resume: 1, max_runtime_seconds: 3600, egress: "{}", endpoint_public: 0, endpoint_token: "et", app_port: null, metadata: "{}",
    created_at: now, expires_at: now, last_activity_at: now, terminated_at: null, terminate_after_suspended_seconds: 0, suspended_at: null, egress_connectors: null,
    hooks: null, image_version: 1, forked_from: null, node_id: owner.nodeId, node_epoch: owner.epoch, suspended_node: null, suspended_object: null, suspended_manifest: null,
    on_node_failure: "fail", restore_object: null, restore_manifest: null, restore_point_at: null,
  };
}

const stateOf = async (db: Db, id: string) => (await db.selectFrom("microvms").select(["state", "state_reason", "node_epoch"]).where("id", "=", id).executeTakeFirstOrThrow());
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Renews the leases of `nodes` (each must succeed) while `ms` pass. */
async function renewing(nodes: ClusterNode[], ms: number): Promise<void> {
  for (const end = Date.now() + ms; Date.now() < end; await sleep(200)) {
    for (const n of nodes) expect(await n.renew()).toBe(true);
  }
}

describe("cluster nodes", () => {
  it("reaps an expired lease once, failing its live VMs and keeping its suspended ones; the woken node changes nothing, fences and rejoins", async () => {
    const [dbA, dbB, dbC] = await database(3);
    const fenced: string[] = [];
    const [a, b, c] = [node(dbA!, "a"), node(dbB!, "b", fenced), node(dbC!, "c")];
    await Promise.all([a.register(), b.register(), c.register()]);
    const running = vmRow(b.owner(), "RUNNING");
    const suspended = vmRow(b.owner(), "SUSPENDED");
    await dbB!.insertInto("microvms").values([running, suspended]).execute();
    // b freezes (no renewals); a and c keep theirs and reap together.
    await renewing([a, c], 1300);
    const [byA, byC] = await Promise.all([a.reap(), c.reap()]);
    expect([...byA, ...byC]).toEqual(["b"]);
    expect(await stateOf(dbA!, running.id)).toMatchObject({ state: "FAILED", state_reason: "node b stopped renewing its lease" });
    expect(await stateOf(dbA!, suspended.id)).toMatchObject({ state: "SUSPENDED" });
    const events = await dbA!.selectFrom("events").select("type").where("microvm_id", "=", running.id).execute();
    expect(events).toEqual([{ type: "failed" }]);
    // b wakes up: a state write conditional on owning the VM at its epoch matches nothing.
    const stale = await dbB!.updateTable("microvms").set({ state: "RESUMING" }).where("id", "=", suspended.id).where(ownedBy(b.owner())).executeTakeFirst();
    expect(stale.numUpdatedRows).toBe(0n);
    expect(await b.renew()).toBe(false);
    await b.fence();
    expect(fenced).toEqual(["b"]);
    expect(b.owner().epoch).toBe(2);
    // Its suspended VM is its own again, at the new epoch.
    expect(await stateOf(dbA!, suspended.id)).toMatchObject({ state: "SUSPENDED", node_epoch: 2 });
    const fresh = await dbB!.updateTable("microvms").set({ state: "RESUMING" }).where("id", "=", suspended.id).where(ownedBy(b.owner())).executeTakeFirst();
    expect(fresh.numUpdatedRows).toBe(1n);
    expect((await listNodes(dbA!)).map((n) => [n.id, n.state, n.epoch, n.lease_live])).toEqual([
      ["a", "active", 1, true],
      ["b", "active", 2, true],
      ["c", "active", 1, true],
    ]);
  });

  it("a reap restores an opted-in running VM with a restore point (SUSPENDED there, no node's, an event saying what is lost) and fails the others, saying why", async () => {
    const [dbA, dbB] = await database(2);
    const [a, b] = [node(dbA!, "a"), node(dbB!, "b")];
    await Promise.all([a.register(), b.register()]);
    const at = "2026-11-25T00:00:00.000Z";
    const point = { on_node_failure: "restore" as const, restore_object: "microvms/x/1", restore_manifest: "ab".repeat(32), restore_point_at: at };
    const restored = { ...vmRow(b.owner(), "RUNNING"), ...point, suspended_node: null };
    const bare = { ...vmRow(b.owner(), "RUNNING"), on_node_failure: "restore" as const };
    const creating = { ...vmRow(b.owner(), "PENDING"), ...point };
    const plain = { ...vmRow(b.owner(), "RUNNING"), restore_object: "microvms/y/1", restore_manifest: "cd".repeat(32), restore_point_at: at };
    await dbB!.insertInto("microvms").values([restored, bare, creating, plain]).execute();
    await renewing([a], 1300);
    expect(await a.reap()).toEqual(["b"]);
    const row = async (id: string) => dbA!.selectFrom("microvms").select(["state", "state_reason", "node_id", "node_epoch", "suspended_node", "suspended_object", "suspended_manifest", "suspended_at"]).where("id", "=", id).executeTakeFirstOrThrow();
    const lost = `restored from its last durable suspend (${at}) after node b stopped renewing its lease: its state since ${at} is lost`;
    expect(await row(restored.id)).toEqual({ state: "SUSPENDED", state_reason: lost, node_id: null, node_epoch: null, suspended_node: null, suspended_object: "microvms/x/1", suspended_manifest: "ab".repeat(32), suspended_at: at });
    expect(await dbA!.selectFrom("events").select(["type", "message"]).where("microvm_id", "=", restored.id).execute()).toEqual([{ type: "restored", message: lost }]);
    expect(await row(bare.id)).toMatchObject({ state: "FAILED", state_reason: "node b stopped renewing its lease; it has no restore point to be restored from (none of its suspends was published to the object store)" });
    expect(await row(creating.id)).toMatchObject({ state: "FAILED", state_reason: "node b stopped renewing its lease while it was PENDING" });
    // Not opted in: FAILED, whatever it holds.
    expect(await row(plain.id)).toMatchObject({ state: "FAILED", state_reason: "node b stopped renewing its lease" });
    // b comes back: the restored VM is not its own any more.
    expect(await b.renew()).toBe(false);
    await b.register();
    expect(await row(restored.id)).toMatchObject({ state: "SUSPENDED", node_id: null });
  });

  it("a quick restart (lease still live) hands the node's VMs to its new epoch; a late one fails its live VMs", async () => {
    const [db1, db2] = await database(2);
    const first = node(db1!, "n");
    await first.register();
    const vm = vmRow(first.owner(), "RUNNING");
    await db1!.insertInto("microvms").values(vm).execute();
    const second = node(db2!, "n");
    await second.register();
    expect(second.owner().epoch).toBe(2);
    expect(await stateOf(db2!, vm.id)).toMatchObject({ state: "RUNNING", node_epoch: 2 });
    // The first life's writes are refused now.
    expect((await db1!.updateTable("microvms").set({ state: "SUSPENDING" }).where("id", "=", vm.id).where(ownedBy(first.owner())).executeTakeFirst()).numUpdatedRows).toBe(0n);
    await sleep(1300);
    const third = node(db1!, "n");
    await third.register();
    expect(await stateOf(db2!, vm.id)).toMatchObject({ state: "FAILED", state_reason: "node n stopped renewing its lease" });
  });

  it("admits under the node's row lock: concurrent creates never exceed its capacity, and a draining node takes none", async () => {
    const dbs = await database(1);
    const here = node(dbs[0]!, "h", [], { vcpus: 4, memoryMiB: 4096 });
    await here.register();
    // Ten creates racing on one node, each its own transaction.
    const admits = Array.from({ length: 10 }, () =>
      here.admit({ vcpus: 1, memoryMiB: 256 }, { vcpus: 0, memoryMiB: 0 }, (tx, owner) => tx.insertInto("microvms").values(vmRow(owner, "PENDING")).execute()).then(
        () => "admitted",
        (err: { code?: string }) => err.code,
      ),
    );
    const outcomes = await Promise.all(admits);
    expect(outcomes.filter((o) => o === "admitted")).toHaveLength(4);
    expect(outcomes.filter((o) => o === "CapacityExceeded")).toHaveLength(6);
    // Builds hold capacity too.
    await dbs[0]!.updateTable("microvms").set({ state: "TERMINATED" }).where("node_id", "=", "h").execute();
    await expect(here.admit({ vcpus: 1, memoryMiB: 256 }, { vcpus: 4, memoryMiB: 512 }, async () => undefined)).rejects.toMatchObject({ code: "CapacityExceeded", details: { resource: "vcpus" } });
    await setNodeDraining(dbs[0]!, "h", true);
    await expect(here.admit({ vcpus: 1, memoryMiB: 256 }, { vcpus: 0, memoryMiB: 0 }, async () => undefined)).rejects.toMatchObject({ code: "CapacityExceeded", details: { state: "draining" } });
    await setNodeDraining(dbs[0]!, "h", false);
    await expect(here.admit({ vcpus: 1, memoryMiB: 256 }, { vcpus: 0, memoryMiB: 0 }, async () => "in")).resolves.toBe("in");
  });

  it("offers a create to live, active peers of the same QEMU build with room, roomiest first", async () => {
    const [db] = await database(1);
    const make = (id: string, capacity: { vcpus: number; memoryMiB: number }, qemuBuild = "qemu-7.2") =>
      new ClusterNode(db!, { ...info(id, capacity), qemuBuild }, { onFenced: async () => undefined, timing: LONG });
    const self = make("self", { vcpus: 1, memoryMiB: 1024 });
    const roomy = make("roomy", { vcpus: 8, memoryMiB: 8192 });
    const small = make("small", { vcpus: 8, memoryMiB: 2048 });
    const full = make("full", { vcpus: 1, memoryMiB: 8192 });
    const other = make("other-build", { vcpus: 8, memoryMiB: 8192 }, "qemu-8.2");
    const drained = make("drained", { vcpus: 8, memoryMiB: 8192 });
    for (const n of [self, roomy, small, full, other, drained]) await n.register();
    await db!.insertInto("microvms").values([vmRow(full.owner(), "RUNNING"), vmRow(roomy.owner(), "SUSPENDED", 8)]).execute();
    await setNodeDraining(db!, "drained", true);
    expect(await self.peersWithRoom({ vcpus: 1, memoryMiB: 512 })).toEqual([info("roomy").url, info("small").url]);
    // What a peer's builds hold counts (published with its renewals).
    const building = new ClusterNode(db!, info("roomy", { vcpus: 8, memoryMiB: 8192 }), { onFenced: async () => undefined, builds: () => ({ vcpus: 8, memoryMiB: 512 }), timing: LONG });
    await building.register();
    expect(await building.renew()).toBe(true);
    expect(await self.peersWithRoom({ vcpus: 1, memoryMiB: 512 })).toEqual([info("small").url]);
  });

  it("hands a suspended VM leaving its node to one node, whichever nodes hand it over at once and to whichever targets; the others find it there", async () => {
    const [dbA, dbB] = await database(2);
    const make = (db: Db, id: string) => new ClusterNode(db, info(id), { onFenced: async () => undefined, timing: LONG });
    const [holder, a, b, drained] = [make(dbA!, "holder"), make(dbA!, "a"), make(dbB!, "b"), make(dbA!, "drained")];
    for (const n of [holder, a, b, drained]) await n.register();
    const vm = { ...vmRow(holder.owner(), "SUSPENDED"), suspended_node: "holder", suspended_object: "microvms/vm/0123456789abcdef", suspended_manifest: "f".repeat(64) };
    await dbA!.insertInto("microvms").values(vm).execute();
    await setNodeDraining(dbA!, "holder", true);
    await setNodeDraining(dbA!, "drained", true);
    // A node that takes no VMs is no target.
    expect(await handOverSuspended(dbA!, vm, { id: "drained", epoch: drained.owner().epoch })).toBeUndefined();
    // Two servers whose usage reads differed pick different targets at the same moment: one update matches.
    const results = await Promise.all([handOverSuspended(dbA!, vm, { id: "a", epoch: a.owner().epoch }), handOverSuspended(dbB!, vm, { id: "b", epoch: b.owner().epoch })]);
    const won = results.filter((r) => r !== undefined);
    expect(won).toHaveLength(1);
    const row = await dbA!.selectFrom("microvms").selectAll().where("id", "=", vm.id).executeTakeFirstOrThrow();
    expect(row).toMatchObject({ state: "SUSPENDED", node_id: won[0]!.node_id, suspended_node: "holder", suspended_object: vm.suspended_object });
    const events = await dbA!.selectFrom("events").select(["type", "message"]).where("microvm_id", "=", vm.id).execute();
    expect(events).toEqual([{ type: "moved", message: `handed to node ${row.node_id} from node holder to resume from the object store` }]);
    // The row as read is gone: a late hand-over (or one from a stale read) changes nothing.
    expect(await handOverSuspended(dbA!, vm, { id: "a", epoch: a.owner().epoch })).toBeUndefined();
  });

  it("tells its lease guard of every lease that took, checks it before each renewal, and, when it cannot run, ends its VMs and lets its lease lapse rather than renew unguarded", async () => {
    const [dbA, dbB] = await database(2);
    const fenced: string[] = [];
    const leases: { sentAtNs: bigint; leaseSeconds: number }[] = [];
    let ensured = 0;
    let broken = false;
    // Records what the server's LeaseFence would be told (the real fence: test/server/lease-fence.test.ts).
    const guard = {
      ensure: async () => {
        ensured++;
        if (broken) throw new Error("cannot start the fence");
      },
      renewed: async (sentAtNs: bigint, leaseSeconds: number) => void leases.push({ sentAtNs, leaseSeconds }),
    };
    const a = new ClusterNode(dbA!, info("a"), { onFenced: async () => void fenced.push("a"), timing: SHORT, guard });
    const b = node(dbB!, "b");
    const before = process.hrtime.bigint();
    await a.start();
    await b.register();
    expect(leases).toHaveLength(1);
    expect(ensured).toBe(1);
    await sleep(700);
    // Renewed meanwhile: each lease sent after the last, before now, with the lease's length.
    expect(leases.length).toBeGreaterThanOrEqual(2);
    expect(leases.every((l, i) => l.leaseSeconds === 1 && l.sentAtNs > (i === 0 ? before : leases[i - 1]!.sentAtNs) && l.sentAtNs < process.hrtime.bigint())).toBe(true);
    expect(ensured).toBeGreaterThanOrEqual(leases.length);
    broken = true;
    while (!fenced.includes("a")) await sleep(50);
    const renewals = leases.length;
    // No renewal without the guard: the lease lapses and a peer reaps the node.
    while (!(await b.reap()).includes("a")) await sleep(100);
    expect(leases.length).toBe(renewals);
    await a.stop();
  });

  it("renews on its own and a node that stops renewing is reaped by its peers", async () => {
    const [dbA, dbB] = await database(2);
    const fenced: string[] = [];
    const a = node(dbA!, "a", fenced);
    const b = node(dbB!, "b");
    await Promise.all([a.start(), b.start()]);
    await sleep(1500);
    // Both alive past their first lease: renewal works.
    expect((await listNodes(dbA!)).map((n) => n.lease_live)).toEqual([true, true]);
    await b.stop();
    while ((await listNodes(dbA!)).find((n) => n.id === "b")!.state !== "dead") await sleep(100);
    await a.stop();
    expect(fenced).toEqual([]);
  });
});
