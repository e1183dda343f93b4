import { Command } from "commander";
import { CocoonError, ConnectionError, UnauthorizedError } from "@cocoon/sdk";
import { registerAdminCommands } from "./commands/admin.ts";
import { registerImageCommands } from "./commands/image.ts";
import { registerMcpCommand } from "./commands/mcp.ts";
import { registerServerCommand } from "./commands/server.ts";
import { registerVmCommands } from "./commands/vm.ts";
import { registerVolumeCommands } from "./commands/volume.ts";
import { CliError } from "./common.ts";
import { dataDir, resolveApiKey, type GlobalOpts } from "./config.ts";

const VERSION = "0.1.0";

const program = new Command("cocoon")
  .description("Cocoon: stateful microVMs launched from snapshots")
  .version(VERSION)
  .option("--url <url>", "server URL (env COCOON_URL, default http://127.0.0.1:7070)")
  .option("--api-key <key>", "API key (env COCOON_API_KEY, else <data dir>/admin.key)")
  .option("--json", "print JSON instead of tables")
  .showHelpAfterError()
  .configureOutput({ outputError: (text, write) => write(text.replace(/^error: /, "cocoon: ")) });

registerServerCommand(program);
registerImageCommands(program);
registerVmCommands(program);
registerVolumeCommands(program);
registerAdminCommands(program);
registerMcpCommand(program);

try {
  await program.parseAsync();
  // Every command but `server` is done here (`mcp` once its stdin ended): exit now
  // rather than wait for idle keep-alive sockets. (stdout and stderr writes are synchronous on Linux.)
  if (program.args[0] !== "server") process.exit(process.exitCode ?? 0);
} catch (err) {
  process.stderr.write(`cocoon: ${await describe(err)}\n`);
  process.exit(1);
}

/** The one line a failure prints: the server's message, with a hint where one helps. */
async function describe(err: unknown): Promise<string> {
  if (err instanceof UnauthorizedError) {
    const { source } = await resolveApiKey(program.opts<GlobalOpts>());
    if (source === "none") return `${err.message} (pass --api-key, set COCOON_API_KEY, or run where ${dataDir()}/admin.key is readable)`;
    return `${err.message} (the key came from ${source})`;
  }
  if (err instanceof ConnectionError) return `${err.message} (is the server running? start it with: cocoon server)`;
  if (err instanceof CocoonError || err instanceof CliError) return err.message;
  return err instanceof Error ? err.message : String(err);
}
