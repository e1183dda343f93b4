import { spawn, type ChildProcess } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { freeLoopbackPort } from "../../src/util/ports.ts";
import { TEST_ASSETS, TEST_ROOT } from "../support/paths.ts";

const children: ChildProcess[] = [];
afterAll(() => children.forEach((c) => c.kill("SIGKILL")));

function startServer(args: string[], dataDir: string): { child: ChildProcess; output: () => string } {
  const child = spawn(process.execPath, ["packages/cli/bin/cocoon.js", "server", ...args, "--data-dir", dataDir], {
    env: { ...process.env, COCOON_ASSETS_DIR: TEST_ASSETS },
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.push(child);
  let output = "";
  child.stdout!.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (output += d.toString()));
  return { child, output: () => output };
}

describe("cocoon server", () => {
  it("prepares its assets and reports health with the accelerator in use", async () => {
    const dataDir = await mkdtemp(join(TEST_ROOT, "srv-"));
    const port = await freeLoopbackPort();
    const server = startServer(["--listen", `127.0.0.1:${port}`], dataDir);
    const deadline = Date.now() + 300_000;
    while (!server.output().includes("ready:")) {
      if (server.child.exitCode !== null) throw new Error(`server exited: ${server.output()}`);
      if (Date.now() > deadline) throw new Error(`server not ready: ${server.output()}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    const res = await fetch(`http://127.0.0.1:${port}/v1/health`);
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ status: "ok", accelerator: expect.stringMatching(/^(kvm|tcg)$/), version: expect.any(String) });
    server.child.kill("SIGTERM");
    await new Promise((r) => server.child.once("exit", r));
    await rm(dataDir, { recursive: true, force: true });
  });

  it("refuses a malformed --listen with a message naming the flag", async () => {
    const dataDir = await mkdtemp(join(TEST_ROOT, "srv-"));
    const server = startServer(["--listen", "127.0.0.1:99999"], dataDir);
    const code = await new Promise((r) => server.child.once("exit", r));
    expect(code).toBe(1);
    expect(server.output()).toContain("--listen must be HOST:PORT with a port between 1 and 65535");
    await rm(dataDir, { recursive: true, force: true });
  });
});
