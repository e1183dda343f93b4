import { buildApi } from "../api/server.ts";
import { resolveServerConfig } from "./config.ts";
import { startRuntime } from "./runtime.ts";

/** `cocoon server`: prepares assets, re-adopts VMs, serves the API until SIGINT/SIGTERM. */
export async function runServer(flags: { listen?: string; dataDir?: string }): Promise<void> {
  const config = resolveServerConfig(flags);
  const log = (line: string) => console.error(`[cocoon] ${line}`);
  log(`data directory ${config.dataDir}`);
  const runtime = await startRuntime({ ...config, log });
  const api = buildApi({ accelerator: runtime.engine.accelerator });
  await api.listen({ host: config.listenHost, port: config.listenPort });
  log(`ready: http://${config.listenHost}:${config.listenPort} (accelerator ${runtime.engine.accelerator}, ${runtime.engine.list().length} VMs adopted)`);
  const stop = async () => {
    // VMs outlive the server process by design; the next start re-adopts them.
    await api.close();
    await runtime.engine.close();
    process.exit(0);
  };
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
}
