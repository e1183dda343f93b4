import { homedir } from "node:os";
import { join, resolve } from "node:path";

export interface ServerConfig {
  listenHost: string;
  listenPort: number;
  dataDir: string;
  /** Kernel, initramfs, agent and root filesystem versions; shared by data dirs in tests. */
  assetsDir: string;
  /** Restored, warmed VMs kept ready per image for instant launches (COCOON_WARM_POOL, default 1). */
  warmPoolSize: number;
  /** An image build that takes longer fails (COCOON_BUILD_TIMEOUT_SECONDS, default 600). */
  buildTimeoutSeconds: number;
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
    warmPoolSize: parseWarmPool(process.env.COCOON_WARM_POOL ?? "1"),
    buildTimeoutSeconds: parseBuildTimeout(process.env.COCOON_BUILD_TIMEOUT_SECONDS ?? "600"),
  };
}

function parseWarmPool(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 16) throw new Error(`COCOON_WARM_POOL must be an integer between 0 and 16, got "${value}"`);
  return n;
}

function parseBuildTimeout(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 10 || n > 86_400) throw new Error(`COCOON_BUILD_TIMEOUT_SECONDS must be an integer between 10 and 86400, got "${value}"`);
  return n;
}
