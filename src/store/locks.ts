import type { Kysely } from "kysely";
import type pg from "pg";
import { KeyedMutex } from "../util/keyed-mutex.ts";

/** Per database: the mutex of this process and, on PostgreSQL, the pool advisory locks are taken on. */
const registry = new WeakMap<Kysely<any>, { local: KeyedMutex; held: Set<string>; pool?: pg.Pool }>();

function entry(db: Kysely<any>) {
  let e = registry.get(db);
  if (!e) registry.set(db, (e = { local: new KeyedMutex(), held: new Set() }));
  return e;
}

/** Called by openPostgres: sections of this database are serialized across every server sharing it. */
export function registerPostgresLocks(db: Kysely<any>, pool: pg.Pool): void {
  entry(db).pool = pool;
}

/** Ends the lock connections of a PostgreSQL database (closeDatabase). */
export async function closeLocks(db: Kysely<any>): Promise<void> {
  await registry.get(db)?.pool?.end();
}

/**
 * Runs `fn` while no other holder of `key` runs, wherever it runs: a check
 * and the write it guards (a quota count and the insert it allows, a client
 * token and the resource it made) are one step. SQLite has one server, so a
 * mutex of this process is the whole lock; on PostgreSQL every server of the
 * cluster shares the database, so the section also holds a session-level
 * advisory lock on a connection of its own (released when `fn` ends, or by
 * PostgreSQL when that connection dies with its server).
 */
export function serialized<T>(db: Kysely<any>, key: string, fn: () => Promise<T>): Promise<T> {
  const { local, pool } = entry(db);
  if (!pool) return local.run(key, fn);
  return local.run(key, async () => {
    const client = await pool.connect();
    try {
      await client.query("SELECT pg_advisory_lock(hashtextextended($1, 0))", [key]);
    } catch (err) {
      client.release(true);
      throw err;
    }
    try {
      return await fn();
    } finally {
      // A connection whose unlock failed may still hold the lock: it is closed, which releases it.
      const unlocked = await client.query("SELECT pg_advisory_unlock(hashtextextended($1, 0))", [key]).then(
        () => true,
        () => false,
      );
      client.release(!unlocked);
    }
  });
}

/**
 * Runs `fn` unless another holder of `key` runs now, wherever it runs
 * (`serialized`'s lock, not waited for): work one node of a cluster does
 * at a time and the others skip. True when `fn` ran.
 */
export async function trySerialized(db: Kysely<any>, key: string, fn: () => Promise<void>): Promise<boolean> {
  const { held, pool } = entry(db);
  if (held.has(key)) return false;
  held.add(key);
  try {
    if (!pool) {
      await fn();
      return true;
    }
    const client = await pool.connect();
    let locked: boolean;
    try {
      locked = (await client.query<{ locked: boolean }>("SELECT pg_try_advisory_lock(hashtextextended($1, 0)) AS locked", [key])).rows[0]?.locked === true;
    } catch (err) {
      client.release(true);
      throw err;
    }
    if (!locked) {
      client.release();
      return false;
    }
    try {
      await fn();
      return true;
    } finally {
      const unlocked = await client.query("SELECT pg_advisory_unlock(hashtextextended($1, 0))", [key]).then(
        () => true,
        () => false,
      );
      client.release(!unlocked);
    }
  } finally {
    held.delete(key);
  }
}
