import { homedir } from "node:os";
import { join, resolve } from "node:path";

export interface ServerConfig {
  listenHost: string;
  listenPort: number;
  dataDir: string;
  /** Kernel, initramfs, agent and root filesystem versions; shared by data dirs in tests. */
  assetsDir: string;
}

/** Flags win over COCOON_* environment variables, which win over defaults (API.md). */
export function resolveServerConfig(flags: { listen?: string; dataDir?: string; assetsDir?: string }): ServerConfig {
  const listen = flags.listen ?? process.env.COCOON_LISTEN ?? "127.0.0.1:7070";
  const match = /^(.*):(\d+)$/.exec(listen);
  const port = Number(match?.[2]);
  if (!match || !match[1] || port < 1 || port > 65535) {
    throw new Error(`--listen must be HOST:PORT with a port between 1 and 65535, got "${listen}"`);
  }
  const dataDir = resolve(flags.dataDir ?? process.env.COCOON_DATA_DIR ?? join(homedir(), ".cocoon"));
  return {
    listenHost: match[1],
    listenPort: port,
    dataDir,
    assetsDir: resolve(flags.assetsDir ?? process.env.COCOON_ASSETS_DIR ?? join(dataDir, "assets")),
  };
}
