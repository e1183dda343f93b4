import SQLite from "better-sqlite3";
import { Kysely, Migrator, PostgresDialect, SqliteDialect, type MigrationProvider } from "kysely";
import pg from "pg";
import { chmodSync } from "node:fs";
import { join } from "node:path";
export { isPostgres } from "./dialect.ts";
import { closeLocks, registerPostgresLocks } from "./locks.ts";
import { migrations } from "./migrations.ts";
import type { Database } from "./schema.ts";

export type Db = Kysely<Database>;

/**
 * Opens `<dataDir>/cocoon.db` (SQLite, WAL) and brings its schema up to date:
 * the single-host default, nothing else to run.
 * `synchronous = FULL`: a transaction is on disk when it commits, because a
 * state change is only recorded after what it depends on is durable.
 */
export async function openDatabase(dataDir: string): Promise<Db> {
  const path = join(dataDir, "cocoon.db");
  const sqlite = new SQLite(path);
  // Key hashes and every VM's endpoint token: the server's alone (SQLite gives its WAL the same mode).
  chmodSync(path, 0o600);
  sqlite.pragma("journal_mode = WAL");
  sqlite.pragma("synchronous = FULL");
  sqlite.pragma("foreign_keys = ON");
  sqlite.pragma("busy_timeout = 5000");
  const db = new Kysely<Database>({ dialect: new SqliteDialect({ database: sqlite }) });
  await migrate(db);
  return db;
}

/** PostgreSQL's type ids whose text form node-postgres leaves as a string by default. */
const INT8_OID = 20;

/**
 * Opens a PostgreSQL database (`postgres://…` or `postgresql://…`, the many-hosts
 * store: docs/cluster.md) and brings its schema up to date, the same
 * migrations as SQLite's. Every server of a cluster runs them at start;
 * Kysely's Migrator takes a lock, so concurrent starts apply each once.
 *
 * Sessions are bounded so that a node frozen in the middle of a transaction
 * (SIGSTOP, a hung host) cannot hold row locks for long: an idle transaction
 * ends after 10 s, and a lock is waited for at most 10 s.
 */
export async function openPostgres(url: string, opts: { log?: (line: string) => void; maxConnections?: number } = {}): Promise<Db> {
  const types = {
    // 64-bit integers (counts, byte sizes) as numbers: every value Cocoon stores is far below 2^53.
    getTypeParser: (oid: number, format?: "text" | "binary") => (oid === INT8_OID ? (v: string) => Number(v) : pg.types.getTypeParser(oid, format as "text")),
  };
  const config: pg.PoolConfig = {
    connectionString: url,
    max: opts.maxConnections ?? 10,
    types,
    options: "-c idle_in_transaction_session_timeout=10000 -c lock_timeout=10000 -c TimeZone=UTC",
    connectionTimeoutMillis: 10_000,
  };
  const pool = new pg.Pool(config);
  // An idle connection the server closes (restart, timeout) is replaced on the next checkout; without a listener it would end the process.
  pool.on("error", (err) => opts.log?.(`database connection lost: ${err.message}`));
  // A pool of its own for advisory locks (store/locks.ts): a lock held across a long operation never starves queries.
  // Its sessions wait for a lock as long as its holder works (a section may span a VM's launch), and a section
  // waits for a free session as long as it takes (one per key held at once in this process).
  const lockPool = new pg.Pool({ ...config, max: 20, connectionTimeoutMillis: 0, options: "-c TimeZone=UTC" });
  lockPool.on("error", (err) => opts.log?.(`database lock connection lost: ${err.message}`));
  const db = new Kysely<Database>({ dialect: new PostgresDialect({ pool }) });
  registerPostgresLocks(db, lockPool);
  try {
    await migrate(db);
  } catch (err) {
    await db.destroy();
    await lockPool.end();
    throw err;
  }
  return db;
}

/** Closes the database's connections (and, on PostgreSQL, those of its locks). */
export async function closeDatabase(db: Db): Promise<void> {
  await closeLocks(db);
  await db.destroy();
}

async function migrate(db: Db): Promise<void> {
  const provider: MigrationProvider = { getMigrations: async () => migrations };
  const { error, results } = await new Migrator({ db, provider, allowUnorderedMigrations: true }).migrateToLatest();
  if (error) {
    const failed = results?.find((r) => r.status === "Error")?.migrationName ?? "unknown";
    throw new Error(`database migration ${failed} failed: ${(error as Error).message}`);
  }
}
