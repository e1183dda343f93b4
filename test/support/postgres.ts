import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chownSync, mkdtempSync, rmSync } from "node:fs";
import { userInfo } from "node:os";
import { join } from "node:path";

/** Debian's PostgreSQL 15 (`postgresql`, scripts/setup.sh). */
const PG_BIN = process.env.COCOON_PG_BIN ?? "/usr/lib/postgresql/15/bin";

export interface TestPostgres {
  /** A `postgresql://` URL of a new, empty database on the server. */
  newDatabase(): Promise<string>;
  /** Stops the server and removes its directory. */
  stop(): Promise<void>;
  /** Its directory: data and the unix socket. */
  readonly dir: string;
}

/**
 * A real PostgreSQL server of its own: `initdb` in a temporary directory,
 * listening only on a unix socket there (no TCP port to collide on). As root
 * it runs as Debian's `postgres` user (the server refuses root). Each test
 * file takes one, and a database per case.
 */
export async function startPostgres(): Promise<TestPostgres> {
  const dir = mkdtempSync("/tmp/cocoon-pg-");
  const asRoot = process.getuid?.() === 0;
  const owner = asRoot ? "postgres" : userInfo().username;
  const user = asRoot ? { uid: Number(spawnSync("id", ["-u", "postgres"], { encoding: "utf8" }).stdout), gid: Number(spawnSync("id", ["-g", "postgres"], { encoding: "utf8" }).stdout) } : {};
  if (user.uid !== undefined) chownSync(dir, user.uid, user.gid);
  const data = join(dir, "data");
  const init = spawnSync(join(PG_BIN, "initdb"), ["-D", data, "-U", owner, "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"], { encoding: "utf8", ...user });
  if (init.status !== 0) throw new Error(`initdb failed: ${init.stderr}`);
  const args = ["-D", data, "-k", dir, "-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=200"];
  const server: ChildProcess = spawn(join(PG_BIN, "postgres"), args, { stdio: ["ignore", "ignore", "pipe"], ...user });
  let log = "";
  server.stderr!.on("data", (d: Buffer) => (log = (log + d.toString()).slice(-4000)));
  const ready = Date.now() + 30_000;
  for (;;) {
    const probe = spawnSync(join(PG_BIN, "pg_isready"), ["-h", dir, "-U", owner], { encoding: "utf8" });
    if (probe.status === 0) break;
    if (server.exitCode !== null || Date.now() > ready) throw new Error(`postgres did not start: ${log}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  let n = 0;
  return {
    dir,
    async newDatabase() {
      const name = `cocoon_${process.pid}_${++n}`;
      const made = spawnSync(join(PG_BIN, "psql"), ["-h", dir, "-U", owner, "-d", "postgres", "-c", `CREATE DATABASE ${name}`], { encoding: "utf8" });
      if (made.status !== 0) throw new Error(`CREATE DATABASE failed: ${made.stderr}`);
      return `postgresql://${owner}@localhost/${name}?host=${encodeURIComponent(dir)}`;
    },
    async stop() {
      if (server.exitCode === null) {
        const exited = new Promise((r) => server.once("exit", r));
        // Immediate shutdown: the database is thrown away.
        server.kill("SIGQUIT");
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
