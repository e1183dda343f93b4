import SQLite from "better-sqlite3";
import { Kysely, Migrator, SqliteDialect, type MigrationProvider } from "kysely";
import { chmodSync } from "node:fs";
import { join } from "node:path";
import { migrations } from "./migrations.ts";
import type { Database } from "./schema.ts";

export type Db = Kysely<Database>;

/**
 * Opens `<dataDir>/cocoon.db` (SQLite, WAL) and brings its schema up to date.
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
  const provider: MigrationProvider = { getMigrations: async () => migrations };
  const { error, results } = await new Migrator({ db, provider, allowUnorderedMigrations: true }).migrateToLatest();
  if (error) {
    const failed = results?.find((r) => r.status === "Error")?.migrationName ?? "unknown";
    throw new Error(`database migration ${failed} failed: ${(error as Error).message}`);
  }
  return db;
}
