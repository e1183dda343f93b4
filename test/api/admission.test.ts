import { rmdir } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { detectCgroups, jailConfigFromEnv } from "../../src/vmm/jail/index.ts";
import { useApi } from "../support/api-fixture.ts";

// A small host: all VMs together may use VM_MEMORY_MIB (their parent
// cgroup's limit), with a low reserve, so a few idle 256 MiB VMs fill it and
// two of them allocating cannot both fit. The parent is this file's own, so
// its limit never touches other VMs on the machine.
const VM_MEMORY_MIB = 400;
const MEMORY_MIB = 256;
const HOG_MIB = 180;
const parent = `cocoon-admission-${process.pid}`;
const jail = { ...jailConfigFromEnv()!, cgroupParent: parent, vmMemoryBytes: VM_MEMORY_MIB * 2 ** 20 };
const guardKills: string[] = [];
const api = await useApi({ capacity: { vcpus: 64, memoryMiB: 64 * 512, real: { reserveMiB: 64, vmMemoryMiB: VM_MEMORY_MIB } }, jail, log: (line) => void (line.startsWith("memory guard: ") && guardKills.push(line)) });
const layout = detectCgroups();

// Runs before the fixture's own cleanup (after-hooks run last first): the VMs' cgroups must be gone before their parent.
afterAll(async () => {
  for (const vm of api.engine.list()) await api.engine.terminate(vm.id).catch(() => undefined);
  for (const mount of new Set(Object.values(layout.mounts))) await rmdir(join(mount, parent)).catch(() => undefined);
});

describe("admission by real memory", () => {
  it("admits idle VMs by what they use, refuses with 503 naming the limit, and VMs that all allocate never take the server or an innocent VM", async () => {
    const key = await api.tenantKey("dense");
    const ids: string[] = [];
    let refused: { status: number; body: any } | undefined;
    while (!refused && ids.length < 12) {
      const res = await api.call("POST", "/v1/microvms", { key, body: { image: "base", memoryMiB: MEMORY_MIB, idlePolicy: { suspendAfterSeconds: 0 } } });
      if (res.status === 201) ids.push(res.body.microVmId);
      else refused = res;
    }
    // Nominally (256 MiB each) only one fits in 400 MiB; by their real use several do.
    expect(refused?.status, JSON.stringify(refused?.body)).toBe(503);
    expect(refused!.body.error).toMatchObject({ code: "CapacityExceeded", details: { resource: "vmMemoryMiB", capacity: VM_MEMORY_MIB } });
    expect(refused!.body.error.message).toContain(`of the ${VM_MEMORY_MIB} MiB all VMs may use`);
    expect(ids.length).toBeGreaterThanOrEqual(3);

    // Every VM but the first starts allocating at once.
    const [innocent, ...hogs] = ids as [string, ...string[]];
    // vec() grows one string in place: HOG_MIB resident at its peak, which
    // fits in the guest. ("x" x N builds a temporary and copies it, 2N at the
    // peak: the guest's own OOM killer ended such hogs part way, at sizes
    // that sometimes let two of them fit beside the idle VM.)
    const hog = `nohup perl -e 'vec($x, ${HOG_MIB} * 2**20 - 1, 8) = 1; sleep 3600' >/dev/null 2>&1 &`;
    // Every hog must have started: a VM whose exec failed would never allocate (and would rightly keep running).
    const started = await Promise.all(hogs.map((id) => api.call("POST", `/v1/microvms/${id}/exec`, { key, body: { command: hog } })));
    for (const res of started) expect(res.body, JSON.stringify(res.body)).toMatchObject({ exitCode: 0 });
    const state = async (id: string) => (await api.call("GET", `/v1/microvms/${id}`, { key })).body.state as string;
    // At most one hog fits beside the idle VM: the others must be ended.
    const deadline = Date.now() + 150_000;
    while ((await Promise.all(hogs.map(state))).filter((s) => s !== "FAILED").length > 1) {
      if (Date.now() > deadline) throw new Error(`hogs not stopped: ${(await Promise.all(hogs.map(state))).join(", ")}; guard: ${guardKills.join("; ")}`);
      await new Promise((r) => setTimeout(r, 500));
    }
    // They were ended for their memory, by the kernel's OOM killer or, where
    // the VMs crawled at the cap first, by the engine's memory guard, and say
    // so: the server (this process) runs on, and the idle VM still answers.
    const ended = await Promise.all(hogs.map(async (id) => (await api.call("GET", `/v1/microvms/${id}`, { key })).body as { state: string; stateReason?: string }));
    for (const vm of ended.filter((v) => v.state === "FAILED")) expect(vm.stateReason).toMatch(/the kernel's OOM killer killed it|the memory guard killed it/);
    expect(await state(innocent)).toBe("RUNNING");
    const exec = await api.call("POST", `/v1/microvms/${innocent}/exec`, { key, body: { command: ["echo", "alive"] } });
    expect(exec.body).toMatchObject({ exitCode: 0, stdout: "alive\n" });
    for (const id of ids) await api.call("DELETE", `/v1/microvms/${id}`, { key });
  }, 280_000);
});
