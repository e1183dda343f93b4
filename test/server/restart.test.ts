import { spawn, type ChildProcess } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { freeLoopbackPort } from "../../src/util/ports.ts";
import { TEST_ASSETS, TEST_ROOT } from "../support/paths.ts";

const dataDir = await mkdtemp(join(TEST_ROOT, "restart-"));
const port = await freeLoopbackPort();
const url = `http://127.0.0.1:${port}`;
let server: ChildProcess | undefined;

/** Starts `cocoon server` as its own process and waits until it answers. */
async function startServer(): Promise<ChildProcess> {
  const child = spawn(process.execPath, ["packages/cli/bin/cocoon.js", "server", "--listen", `127.0.0.1:${port}`, "--data-dir", dataDir], {
    env: { ...process.env, COCOON_ASSETS_DIR: TEST_ASSETS, COCOON_WARM_POOL: "0" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let output = "";
  child.stderr!.on("data", (d: Buffer) => (output += d.toString()));
  const deadline = Date.now() + 300_000;
  while (!output.includes("ready:")) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`server did not start: ${output}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  server = child;
  return child;
}

async function call(method: string, path: string, body?: unknown) {
  const key = (await readFile(join(dataDir, "admin.key"), "utf8")).trim();
  const res = await fetch(`${url}${path}`, {
    method,
    headers: { authorization: `Bearer ${key}`, ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: res.status, body: (await res.json()) as any };
}

afterAll(async () => {
  if (server && server.exitCode === null) {
    server.kill("SIGTERM");
    await new Promise((r) => server!.once("exit", r));
  }
  // Whatever the test left: kill VMs still running from this data directory.
  spawn("pkill", ["-9", "-f", dataDir]);
  await new Promise((r) => setTimeout(r, 500));
  await rm(dataDir, { recursive: true, force: true });
});

describe("server restart without loss", () => {
  it("keeps VMs RUNNING across kill -9, and SUSPENDED across SIGTERM, resuming them on the next request", async () => {
    let child = await startServer();
    const created = await call("POST", "/v1/microvms", { image: "base", idlePolicy: { suspendAfterSeconds: 0 } });
    expect(created.status).toBe(201);
    const id = created.body.microVmId as string;
    await call("POST", `/v1/microvms/${id}/exec`, { command: "echo kept > /root/state; sleep 600 > /dev/null 2>&1 &" });

    child.kill("SIGKILL");
    await new Promise((r) => child.once("exit", r));
    child = await startServer();
    expect((await call("GET", `/v1/microvms/${id}`)).body.state).toBe("RUNNING");
    const afterKill = await call("POST", `/v1/microvms/${id}/exec`, { command: "cat /root/state" });
    expect(afterKill.body.stdout).toContain("kept");

    child.kill("SIGTERM");
    expect(await new Promise((r) => child.once("exit", r))).toBe(0);
    child = await startServer();
    expect((await call("GET", `/v1/microvms/${id}`)).body.state).toBe("SUSPENDED");
    const afterTerm = await call("POST", `/v1/microvms/${id}/exec`, { command: "cat /root/state" });
    expect(afterTerm.body.stdout).toBe("kept\n");
    expect((await call("GET", `/v1/microvms/${id}`)).body.state).toBe("RUNNING");
    const events = (await call("GET", `/v1/microvms/${id}/events`)).body.events.map((e: { message: string }) => e.message);
    expect(events).toEqual(expect.arrayContaining(["suspended (server shutdown)", "resumed (exec in)"]));
    expect((await call("DELETE", `/v1/microvms/${id}`)).body.state).toBe("TERMINATED");
  });
});
