import { readdirSync } from "node:fs";
import { access } from "node:fs/promises";
import { dirname, join } from "node:path";
import { describe, expect, it } from "vitest";
import { ImageService, type ImageServiceOpts } from "../../src/images/service.ts";
import { isAlive, processArgv } from "../../src/util/process.ts";
import { Engine } from "../../src/vmm/engine.ts";
import { engineConfig } from "../support/engine-fixture.ts";
import { useApi } from "../support/api-fixture.ts";
import { makeZip } from "../support/zip.ts";

// One build slot and one place in the queue: the bound on concurrent builds,
// and what a restarted server does with a build that was cut short.
const api = await useApi({ capacity: { vcpus: 4, memoryMiB: 2 * 1024 }, images: { maxConcurrentBuilds: 1, maxQueuedBuilds: 1, settleMs: 500 } });
const alice = await api.tenantKey("alice", ["microvm:*", "image:*"]);
const zip = makeZip([{ name: "x", data: "x" }]);

async function create(name: string, dockerfile: string) {
  const form = new FormData();
  form.set("name", name);
  form.set("dockerfile", dockerfile);
  form.set("code", new Blob([new Uint8Array(zip)]), "code.zip");
  const res = await fetch(`${api.url}/v1/images`, { method: "POST", headers: { authorization: `Bearer ${alice}` }, body: form });
  return { status: res.status, body: (await res.json()) as Record<string, any> };
}

async function waitBuilt(imageId: string, timeoutMs = 300_000): Promise<Record<string, any>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const res = await api.call("GET", `/v1/images/${imageId}`, { key: alice });
    if (res.body.state !== "BUILDING" && res.body.state !== "PENDING") return res.body;
    if (Date.now() > deadline) throw new Error(`image ${imageId} still ${res.body.state}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}
/** QEMU processes whose disk is `<dir>/disk.qcow2`. */
const qemuPidsOf = (dir: string) =>
  readdirSync("/proc")
    .filter((n) => /^\d+$/.test(n))
    .map(Number)
    .filter((pid) => isAlive(pid) && processArgv(pid)?.[0]?.endsWith("qemu-system-x86_64") && processArgv(pid)!.some((a) => a.includes(`${dir}/disk.qcow2`)));
const buildLog = async (imageId: string) => (await api.call("GET", `/v1/images/${imageId}/build-log`, { key: alice })).text;

describe("build slots", () => {
  it("runs one build at a time: the next waits (its log says so), one more is a 429", async () => {
    const first = await create("slow", "FROM debian:bookworm-slim\nRUN sleep 4\n");
    expect(first.status, JSON.stringify(first.body)).toBe(202);
    const second = await create("queued", "FROM debian:bookworm-slim\nRUN true\n");
    expect(second.status, JSON.stringify(second.body)).toBe(202);
    const third = await create("refused", "FROM debian:bookworm-slim\nRUN true\n");
    expect(third.status, JSON.stringify(third.body)).toBe(429);
    expect(third.body.error.message).toContain("1 builds are already waiting for a build slot");

    const waiting = await buildLog(second.body.imageId);
    expect(waiting).toContain("==> waiting for a build slot (1 builds running)");
    expect(waiting).not.toContain("booting the build VM");
    // The running build's VM takes host capacity that admission counts (1 vCPU, 512 MiB), the queued one none yet.
    expect(await api.microvms.usage()).toMatchObject({ usedVcpus: 1, usedMemoryMiB: 512 });

    const a = await waitBuilt(first.body.imageId);
    const b = await waitBuilt(second.body.imageId);
    expect([a.state, b.state], `${a.stateReason} / ${b.stateReason}`).toEqual(["READY", "READY"]);
    expect(Date.parse(b.readyAt)).toBeGreaterThan(Date.parse(a.readyAt));
    const log = await buildLog(second.body.imageId);
    expect(log.indexOf("waiting for a build slot")).toBeLessThan(log.indexOf("booting the build VM"));
    expect((await api.call("GET", "/v1/images?name=refused", { key: alice })).body.images).toEqual([]);
  });
});

describe("a server restart during a build", () => {
  it("fails the build, kills its build VM and leaves no half-built snapshot", async () => {
    const res = await create("interrupted", "FROM debian:bookworm-slim\nRUN sleep 600\n");
    expect(res.status, JSON.stringify(res.body)).toBe(202);
    const opts = (api.images as unknown as { opts: ImageServiceOpts }).opts;
    const dir = join(opts.imagesDir, res.body.imageId);
    // Wait until the build VM runs the RUN step.
    const deadline = Date.now() + 120_000;
    while (!(await buildLog(res.body.imageId)).includes("==> line 2: RUN sleep 600")) {
      if (Date.now() > deadline) throw new Error(`the build never reached RUN:\n${await buildLog(res.body.imageId)}`);
      await new Promise((r) => setTimeout(r, 250));
    }
    // The build VM: a template QEMU whose disk is the snapshot being built.
    const pid = qemuPidsOf(join(dir, "snapshot"))[0]!;
    expect(pid).toBeGreaterThan(0);

    // What a restarted server does: a new image service over the same database and directory fails
    // the builds an earlier one left, and its engine ends their template VMs. (A real restart ends
    // the VMs first; here the old service lives on in this process, and once its build VM is killed
    // it would record its own failure first: the first terminal state written is the one kept.)
    const restarted = new ImageService(opts);
    await restarted.start();
    const row = (await api.call("GET", `/v1/images/${res.body.imageId}`, { key: alice })).body;
    expect(row).toMatchObject({ state: "FAILED", stateReason: "the server restarted during the build" });
    const dataDir = dirname(opts.imagesDir);
    const engine = await Engine.open(engineConfig(dataDir));
    await engine.close();
    await expect(access(join(dir, "snapshot"))).rejects.toThrow();
    await expect(access(join(dir, "code.zip"))).rejects.toThrow();
    expect(isAlive(pid)).toBe(false);
    await restarted.close();

    // The old service's build ends too (its VM is gone) and the image stays FAILED, unlaunchable.
    expect((await waitBuilt(res.body.imageId, 60_000)).state).toBe("FAILED");
    expect((await api.call("POST", "/v1/microvms", { key: alice, body: { image: "interrupted" } })).status).toBe(409);
  });
});
