import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeEach, describe, expect, it } from "vitest";
import { freeLoopbackPort } from "../../src/util/ports.ts";
import { isAlive } from "../../src/util/process.ts";
import { CocoonServer } from "../support/cocoon-server.ts";
import { TEST_ROOT } from "../support/paths.ts";

/** `npm start` runs the server supervised (issue #11): a crash is followed by a restart, and the VMs live on. */
const server = new CocoonServer({ dataDir: await mkdtemp(join(TEST_ROOT, "supervise-")), port: await freeLoopbackPort(), supervise: true });

beforeEach(({ onTestFailed }) => onTestFailed(() => void process.stderr.write(`[supervised server] log tail:\n${server.output().slice(-4000)}\n`)));

afterAll(async () => {
  // A supervisor killed outright leaves its server: end both.
  const child = serverPid();
  await server.stop("SIGKILL");
  if (child && isAlive(child)) process.kill(child, "SIGKILL");
  await rm(server.opts.dataDir, { recursive: true, force: true });
});

/** The pid of the server the supervisor started last, from its log. */
const serverPid = () => Number([...server.output().matchAll(/\[cocoon-supervisor\] server started \(pid (\d+)\)/g)].at(-1)?.[1]);

describe("the supervisor", () => {
  it("restarts a crashed server, which re-adopts its VMs, and stops it gracefully on SIGTERM", async () => {
    await server.start();
    const created = await server.call("POST", "/v1/microvms", { image: "base" });
    expect(created.status).toBe(201);
    const id = created.body.microVmId as string;
    await server.call("POST", `/v1/microvms/${id}/exec`, { command: "echo kept > /dev/shm/marker" });

    const first = serverPid();
    process.kill(first, "SIGKILL");
    // It says what happened and starts a new server (RESTART_DELAY_MS = 1 s); that one re-adopts the VM.
    await server.waitForLog("restarting in 1 s", 1, 10_000);
    await server.waitForLog("ready:", 2, 60_000);
    expect(server.output()).toMatch(/server exited \(SIGKILL\) after [\d.]+ s; restarting in 1 s/);
    expect(serverPid()).not.toBe(first);
    expect(isAlive(first)).toBe(false);
    const exec = await server.call("POST", `/v1/microvms/${id}/exec`, { command: "cat /dev/shm/marker" });
    expect(exec.body.stdout).toBe("kept\n");

    // SIGTERM to the supervisor stops the server the graceful way: every VM suspended, status 0.
    const last = serverPid();
    expect(await server.stop("SIGTERM")).toBe(0);
    expect(isAlive(last)).toBe(false);
    expect(server.count("restarting in")).toBe(1);
    expect(server.output()).toContain("shutting down: suspending running VMs");
  });
});
