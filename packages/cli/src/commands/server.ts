import { spawn, type ChildProcess } from "node:child_process";
import type { Command } from "commander";

/**
 * `cocoon server`: the one command that is not an HTTP client. It runs the
 * server of the Cocoon checkout this CLI lives in: the root package's
 * `exports["./server"]`, imported as `cocoon/server` (tsconfig paths, and the
 * bundler's alias in bin/compile.js), loaded only when this command runs.
 */
export function registerServerCommand(program: Command): void {
  program
    .command("server")
    .description("prepare guest assets, re-adopt running VMs and serve the API")
    .option("--listen <host:port>", "address to listen on (env COCOON_LISTEN, default 127.0.0.1:7070)")
    .option("--data-dir <dir>", "data directory (env COCOON_DATA_DIR, default ~/.cocoon)")
    .option("--metrics-public", "serve GET /metrics without the admin key")
    .option("--supervise", "run the server as a child and restart it whenever it exits (what `npm start` runs)")
    .action(async (opts: { listen?: string; dataDir?: string; metricsPublic?: boolean; supervise?: boolean }) => {
      if (opts.supervise) return supervise(process.argv.slice(2).filter((a) => a !== "--supervise"));
      const { runServer } = await import("cocoon/server");
      await runServer(opts);
    });
  // Started by a cluster node's server, detached (docs/cluster.md, the lease fence); not for users.
  program
    .command("lease-fence", { hidden: true })
    .requiredOption("--data-dir <dir>")
    .requiredOption("--cgroup-parent <path>")
    .action(async (opts: { dataDir: string; cgroupParent: string }) => {
      const { runLeaseFence } = await import("cocoon/lease-fence");
      await runLeaseFence(opts);
    });
}

/** First restart delay; doubled (up to the max) while the server keeps dying before it has run a minute. */
const RESTART_DELAY_MS = 1000;
const MAX_RESTART_DELAY_MS = 30_000;
const STABLE_MS = 60_000;

/**
 * Keeps `cocoon server <args>` running: a server that exits for any reason
 * (a crash, a kill) is started again after RESTART_DELAY_MS and the restart
 * is logged. VMs outlive the server and the next one re-adopts them.
 * SIGTERM/SIGINT go to the server (which suspends every VM and exits) and
 * then end the supervisor with the server's status. The supervisor loads
 * none of the server's code, so nothing the server does can take it down.
 */
function supervise(args: string[]): Promise<void> {
  const log = (line: string) => process.stderr.write(`[cocoon-supervisor] ${line}\n`);
  let child: ChildProcess | undefined;
  let stopping = false;
  let delayMs = RESTART_DELAY_MS;
  const start = () => {
    const startedAt = Date.now();
    const server = spawn(process.execPath, [process.argv[1]!, ...args], { stdio: "inherit" });
    child = server;
    log(`server started (pid ${server.pid})`);
    server.on("exit", (code, signal) => {
      child = undefined;
      if (stopping) process.exit(code ?? 1);
      delayMs = Date.now() - startedAt >= STABLE_MS ? RESTART_DELAY_MS : delayMs;
      log(`server exited (${signal ?? `code ${code}`}) after ${((Date.now() - startedAt) / 1000).toFixed(1)} s; restarting in ${delayMs / 1000} s`);
      setTimeout(start, delayMs);
      delayMs = Math.min(delayMs * 2, MAX_RESTART_DELAY_MS);
    });
  };
  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    process.on(signal, () => {
      stopping = true;
      if (child) child.kill(signal);
      else process.exit(0);
    });
  }
  start();
  return new Promise(() => undefined); // runs until a signal ends it
}
