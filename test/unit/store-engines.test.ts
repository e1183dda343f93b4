import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { closeDatabase, isPostgres, openDatabase, openPostgres, type Db } from "../../src/store/db.ts";
import { IdempotencyTokens } from "../../src/store/idempotency.ts";
import { serialized, trySerialized } from "../../src/store/locks.ts";
import { migrations } from "../../src/store/migrations.ts";
import { ServerSecrets } from "../../src/store/secrets.ts";
import { listTags, tagResource } from "../../src/store/tags.ts";
import { createApiKey, createTenant, findLiveKey, hasAdminKey, revokeKey } from "../../src/store/tenants.ts";
import { startPostgres, type TestPostgres } from "../support/postgres.ts";

/*
 * The same store code on both engines: SQLite (the single-host default) and a
 * real PostgreSQL 15 (the cluster's), started here in a temporary directory.
 */
let postgres: TestPostgres;
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "cocoon-store-"));
  postgres = await startPostgres();
});
afterAll(async () => {
  await postgres?.stop();
  await rm(dir, { recursive: true, force: true });
});

const engines: [string, () => Promise<Db>][] = [
  ["SQLite", async () => openDatabase(await mkdtemp(join(dir, "db-")))],
  ["PostgreSQL", async () => openPostgres(await postgres.newDatabase())],
];

describe.each(engines)("the store on %s", (engine, open) => {
  it("applies every migration, once, and reads numbers as numbers", async () => {
    const db = await open();
    try {
      expect(isPostgres(db)).toBe(engine === "PostgreSQL");
      const applied = await db.selectFrom("kysely_migration" as never).select("name" as never).execute();
      expect(applied.map((r) => (r as { name: string }).name).sort()).toEqual(Object.keys(migrations).sort());
      const tenant = await createTenant(db, "acme");
      const at = new Date().toISOString();
      for (const type of ["a", "b"]) await db.insertInto("events").values({ microvm_id: "vm-1", tenant_id: tenant.id, type, message: "", at }).execute();
      const events = await db.selectFrom("events").select(["id", "type"]).orderBy("id").execute();
      expect(typeof events[0]!.id).toBe("number");
      expect(events[1]!.id).toBeGreaterThan(events[0]!.id);
      const count = await db.selectFrom("events").select((eb) => eb.fn.countAll<number>().as("n")).executeTakeFirstOrThrow();
      expect(count.n).toBe(2);
    } finally {
      await closeDatabase(db);
    }
  });

  it("keeps byte sizes past 2^31 and upserts tags", async () => {
    const db = await open();
    try {
      const tenant = await createTenant(db, "acme");
      const big = 5 * 1024 ** 3;
      await db
        .insertInto("images")
        .values({
          id: "img-1", tenant_id: tenant.id, name: "app", version: 1, state: "READY", state_reason: null, created_at: new Date().toISOString(), ready_at: null,
          size_bytes: big, disk_bytes: big, memory_bytes: big, app_port: null, vcpus: 1, memory_mib: 512, disk_gib: 8, dockerfile_digest: "d", code_digest: "c",
          code_source: "inline", parent_image_id: null, config: "{}", build_ms: null,
        })
        .execute();
      expect((await db.selectFrom("images").select("size_bytes").executeTakeFirstOrThrow()).size_bytes).toBe(big);
      const resource = { type: "microvm" as const, id: "vm-1" };
      await tagResource(db, tenant.id, resource, { team: "a" });
      await tagResource(db, tenant.id, resource, { team: "b", env: "prod" });
      expect(await listTags(db, tenant.id, resource)).toEqual({ team: "b", env: "prod" });
    } finally {
      await closeDatabase(db);
    }
  });

  it("finds and revokes API keys, and replays a client token", async () => {
    const db = await open();
    try {
      const secrets = await ServerSecrets.open(await mkdtemp(join(dir, "secrets-")));
      const tenant = await createTenant(db, "acme");
      const { key, apiKey } = await createApiKey(db, secrets, { tenantId: tenant.id, permissions: ["admin:*"] });
      expect(await hasAdminKey(db)).toBe(true);
      expect((await findLiveKey(db, apiKey))?.id).toBe(key.id);
      expect(await revokeKey(db, key.id)).toBe(true);
      expect(await findLiveKey(db, apiKey)).toBeUndefined();
      const tokens = new IdempotencyTokens(db);
      let made = 0;
      const create = async () => `vm-${++made}`;
      const key1 = { tenantId: tenant.id, operation: "create", token: "t-1" };
      const [a, b] = await Promise.all([tokens.run(key1, { x: 1 }, create), tokens.run(key1, { x: 1 }, create)]);
      expect(made).toBe(1);
      expect([a.replayed, b.replayed].sort()).toEqual([false, true]);
      await expect(tokens.run(key1, { x: 2 }, create)).rejects.toMatchObject({ code: "Conflict" });
    } finally {
      await closeDatabase(db);
    }
  });
});

describe("PostgreSQL shared by several servers", () => {
  it("runs the migrations once when servers start together", async () => {
    const url = await postgres.newDatabase();
    const dbs = await Promise.all([openPostgres(url), openPostgres(url), openPostgres(url)]);
    try {
      const applied = await dbs[0]!.selectFrom("kysely_migration" as never).select("name" as never).execute();
      expect(applied).toHaveLength(Object.keys(migrations).length);
    } finally {
      await Promise.all(dbs.map(closeDatabase));
    }
  });

  it("serializes a section across servers", async () => {
    const url = await postgres.newDatabase();
    const [a, b] = await Promise.all([openPostgres(url), openPostgres(url)]);
    try {
      const trace: string[] = [];
      const section = (db: Db, who: string) =>
        serialized(db, "quota:tnt-1", async () => {
          trace.push(`${who} in`);
          await new Promise((r) => setTimeout(r, 50));
          trace.push(`${who} out`);
        });
      await Promise.all([section(a, "a1"), section(b, "b1"), section(a, "a2"), section(b, "b2")]);
      expect(trace).toHaveLength(8);
      for (let i = 0; i < trace.length; i += 2) expect(trace[i + 1]).toBe(trace[i]!.replace("in", "out"));
    } finally {
      await Promise.all([closeDatabase(a), closeDatabase(b)]);
    }
  });

  it("lets one server run a section the others skip while it runs (trySerialized), and any once it is done", async () => {
    const url = await postgres.newDatabase();
    const [a, b] = await Promise.all([openPostgres(url), openPostgres(url)]);
    try {
      let release!: () => void;
      const held = new Promise<void>((r) => (release = r));
      const first = trySerialized(a, "bucket-sweep", () => held);
      await new Promise((r) => setTimeout(r, 100));
      // Elsewhere and on the same server: skipped, not waited for.
      expect(await trySerialized(b, "bucket-sweep", async () => undefined)).toBe(false);
      expect(await trySerialized(a, "bucket-sweep", async () => undefined)).toBe(false);
      release();
      expect(await first).toBe(true);
      expect(await trySerialized(b, "bucket-sweep", async () => undefined)).toBe(true);
    } finally {
      await Promise.all([closeDatabase(a), closeDatabase(b)]);
    }
  });
});
