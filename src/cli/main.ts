import { Command } from "commander";
import { VERSION } from "../api/server.ts";
import { runServer } from "../server/main.ts";

const program = new Command("cocoon").description("Cocoon: stateful microVMs launched from snapshots").version(VERSION);

program
  .command("server")
  .description("prepare guest assets, re-adopt running VMs and serve the API")
  .option("--listen <host:port>", "address to listen on (env COCOON_LISTEN)", undefined)
  .option("--data-dir <dir>", "data directory (env COCOON_DATA_DIR, default ~/.cocoon)")
  .action(async (opts: { listen?: string; dataDir?: string }) => {
    await runServer(opts);
  });

program.parseAsync().catch((err: Error) => {
  console.error(`cocoon: ${err.message}`);
  process.exit(1);
});
