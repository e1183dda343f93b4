import { execFileSync } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { freeLoopbackPort } from "../../src/util/ports.ts";
import { CocoonServer } from "../support/cocoon-server.ts";
import { TEST_ROOT } from "../support/paths.ts";

const server = new CocoonServer({ dataDir: await mkdtemp(join(TEST_ROOT, "restart-")), port: await freeLoopbackPort() });

afterAll(async () => {
  await server.stop("SIGTERM");
  // Whatever the test left: kill VMs still running from this data directory.
  try {
    execFileSync("pkill", ["-9", "-f", `${server.opts.dataDir}/`], { stdio: "ignore" });
  } catch {
    // nothing left
  }
  await new Promise((r) => setTimeout(r, 500));
  await rm(server.opts.dataDir, { recursive: true, force: true });
});

describe("server restart without loss", () => {
  it("keeps VMs RUNNING across kill -9, and SUSPENDED across SIGTERM, resuming them on the next request, with their volumes", async () => {
    await server.start();
    expect((await server.call("POST", "/v1/volumes", { name: "kept", sizeGiB: 1 })).status).toBe(201);
    const created = await server.call("POST", "/v1/microvms", { image: "base", idlePolicy: { suspendAfterSeconds: 0 }, volumes: [{ name: "kept", path: "/data" }] });
    expect(created.status).toBe(201);
    const id = created.body.microVmId as string;
    await server.call("POST", `/v1/microvms/${id}/exec`, { command: "echo kept > /root/state; echo on-volume > /data/state; sleep 600 > /dev/null 2>&1 &" });

    await server.stop("SIGKILL");
    await server.start();
    expect((await server.call("GET", `/v1/microvms/${id}`)).body.state).toBe("RUNNING");
    const afterKill = await server.call("POST", `/v1/microvms/${id}/exec`, { command: "cat /root/state /data/state" });
    expect(afterKill.body.stdout).toBe("kept\non-volume\n");

    expect(await server.stop("SIGTERM")).toBe(0);
    await server.start();
    expect((await server.call("GET", `/v1/microvms/${id}`)).body.state).toBe("SUSPENDED");
    const afterTerm = await server.call("POST", `/v1/microvms/${id}/exec`, { command: "cat /root/state /data/state" });
    expect(afterTerm.body.stdout).toBe("kept\non-volume\n");
    expect((await server.call("GET", `/v1/microvms/${id}`)).body.state).toBe("RUNNING");
    const events = (await server.call("GET", `/v1/microvms/${id}/events`)).body.events.map((e: { message: string }) => e.message);
    expect(events).toEqual(expect.arrayContaining(["suspended (server shutdown)", "resumed (exec in)"]));
    expect((await server.call("DELETE", `/v1/microvms/${id}`)).body.state).toBe("TERMINATED");
    // The volume outlived its VM and is free again.
    expect((await server.call("DELETE", "/v1/volumes/kept")).status).toBe(200);
  });

  it("keeps forked VMs, with their own memory and disk, across kill -9 and SIGTERM", async () => {
    // The server of the test above runs on.
    const created = await server.call("POST", "/v1/microvms", { image: "base", idlePolicy: { suspendAfterSeconds: 0 } });
    const parent = created.body.microVmId as string;
    await server.call("POST", `/v1/microvms/${parent}/exec`, { command: "echo parent > /root/f; echo parent > /dev/shm/m" });
    const forked = await server.call("POST", `/v1/microvms/${parent}/fork`, { count: 1 });
    expect(forked.status, JSON.stringify(forked.body)).toBe(201);
    const child = forked.body.microVms[0].microVmId as string;
    await server.call("POST", `/v1/microvms/${child}/exec`, { command: "echo child > /root/f; echo child > /dev/shm/m" });
    const read = async (id: string) => (await server.call("POST", `/v1/microvms/${id}/exec`, { command: "cat /root/f /dev/shm/m" })).body.stdout;

    await server.stop("SIGKILL");
    await server.start();
    expect((await server.call("GET", `/v1/microvms/${child}`)).body).toMatchObject({ state: "RUNNING", forkedFrom: parent });
    expect(await read(child)).toBe("child\nchild\n");

    expect(await server.stop("SIGTERM")).toBe(0);
    await server.start();
    expect((await server.call("GET", `/v1/microvms/${child}`)).body.state).toBe("SUSPENDED");
    expect(await read(child)).toBe("child\nchild\n");
    expect(await read(parent)).toBe("parent\nparent\n");
    for (const id of [parent, child]) expect((await server.call("DELETE", `/v1/microvms/${id}`)).body.state).toBe("TERMINATED");
  });
});
