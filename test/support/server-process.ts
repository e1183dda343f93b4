import { spawn, type ChildProcess } from "node:child_process";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeEach } from "vitest";
import { freeLoopbackPort } from "../../src/util/ports.ts";
import { TEST_ASSETS, TEST_ROOT } from "./paths.ts";

export interface ServerProcess {
  url: string;
  dataDir: string;
  /** The bootstrap admin key, read from `<dataDir>/admin.key`. */
  adminKey: string;
  /** Environment for a CLI child process: COCOON_URL and COCOON_DATA_DIR of this server (the key comes from admin.key). */
  cliEnv: NodeJS.ProcessEnv;
  /** The server's stderr so far. */
  output(): string;
}

/** The `cocoon` bin that npm links from the CLI workspace. */
export const CLI_BIN = "packages/cli/bin/cocoon.js";

/**
 * One real `cocoon server` process per test file (its own data directory and
 * port, the shared test assets, no warm pool), started through the CLI's bin
 * like a user would. When a test fails, the server's log tail is printed.
 * After the file, every VM it still has is terminated through the API, the
 * server is stopped, and any QEMU left behind (by a crash) is killed by the
 * pid in its record; then the data directory is removed.
 */
export async function useServerProcess(): Promise<ServerProcess> {
  const dataDir = await mkdtemp(join(TEST_ROOT, "srv-"));
  const port = await freeLoopbackPort();
  const url = `http://127.0.0.1:${port}`;
  const child: ChildProcess = spawn(process.execPath, [CLI_BIN, "server", "--listen", `127.0.0.1:${port}`, "--data-dir", dataDir], {
    env: { ...process.env, COCOON_ASSETS_DIR: TEST_ASSETS, COCOON_WARM_POOL: "0" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let output = "";
  child.stderr!.on("data", (d: Buffer) => (output += d.toString()));

  afterAll(async () => {
    const key = await readFile(join(dataDir, "admin.key"), "utf8").catch(() => "");
    const auth = { authorization: `Bearer ${key.trim()}` };
    if (child.exitCode === null) {
      const list = await fetch(`${url}/v1/microvms?limit=1000`, { headers: auth })
        .then((r) => r.json() as Promise<{ microVms?: { microVmId: string; state: string }[] }>)
        .catch(() => ({ microVms: [] }));
      for (const vm of list.microVms ?? []) {
        if (vm.state !== "TERMINATED") await fetch(`${url}/v1/microvms/${vm.microVmId}`, { method: "DELETE", headers: auth }).catch(() => undefined);
      }
      child.kill("SIGTERM");
      await new Promise((r) => child.once("exit", r));
    }
    await killLeftoverQemu(dataDir);
    await rm(dataDir, { recursive: true, force: true });
  });

  const deadline = Date.now() + 300_000;
  while (!output.includes("ready:")) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`cocoon server did not start:\n${output}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const adminKey = (await readFile(join(dataDir, "admin.key"), "utf8")).trim();

  beforeEach(({ onTestFailed }) => {
    onTestFailed(() => {
      process.stderr.write(`[cocoon server ${url}, data ${dataDir}] log tail:\n${output.slice(-3000)}\n`);
    });
  });

  return {
    url,
    dataDir,
    adminKey,
    cliEnv: { ...process.env, COCOON_URL: url, COCOON_DATA_DIR: dataDir, COCOON_API_KEY: "" },
    output: () => output,
  };
}

/** Kills, by the pid in `vms/<id>/vm.json`, any QEMU the server left running (it spawns them detached). */
async function killLeftoverQemu(dataDir: string): Promise<void> {
  const vmsDir = join(dataDir, "vms");
  for (const id of await readdir(vmsDir).catch(() => [] as string[])) {
    const record = await readFile(join(vmsDir, id, "vm.json"), "utf8")
      .then((t) => JSON.parse(t) as { pid?: number })
      .catch(() => undefined);
    if (!record?.pid) continue;
    try {
      // Only if it still is a QEMU of this data directory (the pid may have been reused).
      const cmdline = await readFile(`/proc/${record.pid}/cmdline`, "utf8");
      if (cmdline.includes(dataDir)) process.kill(record.pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
}
