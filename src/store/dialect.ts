import { PostgresAdapter, type Kysely } from "kysely";

/** Whether `db` is PostgreSQL (the cluster store, docs/cluster.md) rather than SQLite (the single-host default). */
export function isPostgres(db: Kysely<any>): boolean {
  return db.getExecutor().adapter instanceof PostgresAdapter;
}
