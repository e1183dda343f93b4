import { readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import type { Command } from "commander";
import { CliError } from "../common.ts";

/** What the root package's `./server` export provides. */
interface ServerEntry {
  runServer(flags: { listen?: string; dataDir?: string; metricsPublic?: boolean }): Promise<void>;
}

/**
 * `cocoon server`: the one command that is not an HTTP client. It runs the
 * server of the Cocoon checkout this CLI lives in (the root package, whose
 * `exports["./server"]` names the entry), loaded only when this command runs.
 */
export function registerServerCommand(program: Command): void {
  program
    .command("server")
    .description("prepare guest assets, re-adopt running VMs and serve the API")
    .option("--listen <host:port>", "address to listen on (env COCOON_LISTEN, default 127.0.0.1:7070)")
    .option("--data-dir <dir>", "data directory (env COCOON_DATA_DIR, default ~/.cocoon)")
    .option("--metrics-public", "serve GET /metrics without the admin key")
    .action(async (opts: { listen?: string; dataDir?: string; metricsPublic?: boolean }) => {
      const server = (await import(await serverEntry())) as ServerEntry;
      await server.runServer(opts);
    });
}

/**
 * The root package is not installed into node_modules (it is the workspace
 * root), so it cannot be imported by name: find its package.json above this
 * file and follow its `exports["./server"]`.
 */
async function serverEntry(): Promise<string> {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = await readFile(join(dir, "package.json"), "utf8")
      .then((text) => JSON.parse(text) as { name?: string; exports?: Record<string, string> })
      .catch(() => undefined);
    const entry = pkg?.name === "cocoon" ? pkg.exports?.["./server"] : undefined;
    if (entry) return pathToFileURL(join(dir, entry)).href;
    const parent = dirname(dir);
    if (parent === dir) throw new CliError("cocoon server runs from a Cocoon checkout: no package.json named cocoon with exports ./server above the CLI");
    dir = parent;
  }
}
