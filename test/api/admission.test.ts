import { readdir, readFile, rmdir } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { detectCgroups, jailConfigFromEnv } from "../../src/vmm/jail/index.ts";
import { useApi } from "../support/api-fixture.ts";

// A small host: all VMs together may use VM_MEMORY_MIB (their parent
// cgroup's limit), with a low reserve, so a few idle 320 MiB VMs fill it and
// two of them allocating cannot both fit. The parent is this file's own, so
// its limit never touches other VMs on the machine.
const VM_MEMORY_MIB = 400;
const MEMORY_MIB = 320;
/** What a hog leaves of its guest's workload memory limit: for perl itself and the shell that starts it. */
const HOG_SPARE_MIB = 16;
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

/** Waits up to 20 s for `cond`; the failure names what did not happen. */
async function until(cond: () => Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`not within 20 s: ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** A shell command that succeeds while a perl process runs (the base image has no pgrep). */
const PERL_RUNS = `for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = perl ] && exit 0; done; exit 1`;

/** What the VMs' cgroups hold, and what each hog's guest says of its hog: a failure explains itself. */
async function memoryReport(key: string, hogs: string[]): Promise<string> {
  const memory = join(layout.mounts.memory, parent);
  const file = (dir: string, name: string) => readFile(join(dir, name), "utf8").then((t) => t.trim(), () => "?");
  const stat = async (dir: string) => {
    const fields = Object.fromEntries((await file(dir, "memory.stat")).split("\n").map((l) => l.split(" ") as [string, string]));
    const mib = (k: string) => Math.round(Number(fields[k] ?? fields[`total_${k}`]) / 2 ** 20);
    return layout.version === 1
      ? `usage ${Math.round(Number(await file(dir, "memory.usage_in_bytes")) / 2 ** 20)} MiB (rss ${mib("rss")}, cache ${mib("cache")}), failcnt ${await file(dir, "memory.failcnt")}`
      : `current ${Math.round(Number(await file(dir, "memory.current")) / 2 ** 20)} MiB (anon ${mib("anon")}, file ${mib("file")})`;
  };
  const lines = [`parent: ${await stat(memory)}`];
  for (const name of await readdir(memory, { withFileTypes: true }).then((e) => e.filter((d) => d.isDirectory()).map((d) => d.name), () => [])) {
    lines.push(`${name}: ${await stat(join(memory, name))}`);
  }
  for (const id of hogs) {
    const res = await api.call("POST", `/v1/microvms/${id}/exec`, { key, body: { command: `(${PERL_RUNS}) && echo perl runs || echo no perl; cat /sys/fs/cgroup/cocoon-workload/memory.current /sys/fs/cgroup/cocoon-workload/memory.events`, timeoutSeconds: 10 } }).catch((e: Error) => ({ body: e.message }));
    lines.push(`${id} guest: ${JSON.stringify(res.body).slice(0, 300)}`);
  }
  return lines.join("; ");
}

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
    // Nominally (320 MiB each) only one fits in 400 MiB; by their real use several do.
    expect(refused?.status, JSON.stringify(refused?.body)).toBe(503);
    expect(refused!.body.error).toMatchObject({ code: "CapacityExceeded", details: { resource: "vmMemoryMiB", capacity: VM_MEMORY_MIB } });
    expect(refused!.body.error.message).toContain(`of the ${VM_MEMORY_MIB} MiB all VMs may use`);
    expect(ids.length).toBeGreaterThanOrEqual(3);

    // Every VM but the first starts allocating at once.
    const [innocent, ...hogs] = ids as [string, ...string[]];
    // Each hog takes all its guest lets a workload hold (the agent's
    // cocoon-workload cgroup, ~200 MiB of a 320 MiB guest) but a little for
    // perl itself: more, and the guest's own OOM killer ends the hog, which
    // leaves its VM small and rightly running. vec() grows one string in place
    // ("x" x N builds a temporary and copies it, twice N at the peak).
    const hog = `limit=$(cat /sys/fs/cgroup/cocoon-workload/memory.max); nohup perl -e 'vec($x, $ARGV[0] - 1, 8) = 1; sleep 3600' $((limit - ${HOG_SPARE_MIB} * 1048576)) >/dev/null 2>&1 &`;
    const state = async (id: string) => (await api.call("GET", `/v1/microvms/${id}`, { key })).body.state as string;
    // Every hog must have started: a VM whose exec failed would never allocate
    // (and would rightly keep running). A hog's VM may be ended for its memory
    // before its exec is answered: the exec's connection breaks (502).
    const started = await Promise.all(hogs.map((id) => api.call("POST", `/v1/microvms/${id}/exec`, { key, body: { command: hog } })));
    for (const [i, res] of started.entries()) {
      if (res.status === 502) await until(async () => (await state(hogs[i]!)) === "FAILED", `${hogs[i]} FAILED after its exec broke: ${res.text}`);
      else expect(res.body, res.text).toMatchObject({ exitCode: 0 });
    }
    // At most one hog fits beside the idle VM: the others must be ended.
    const deadline = Date.now() + 150_000;
    while ((await Promise.all(hogs.map(state))).filter((s) => s !== "FAILED").length > 1) {
      if (Date.now() > deadline) throw new Error(`hogs not stopped: ${(await Promise.all(hogs.map(state))).join(", ")}; guard: ${guardKills.join("; ")}; ${await memoryReport(key, hogs)}`);
      await new Promise((r) => setTimeout(r, 500));
    }
    // They were ended for their memory, by the kernel's OOM killer or, where
    // the VMs crawled at the cap first, by the engine's memory guard, and say
    // so: the server (this process) runs on, and the idle VM still answers.
    const ended = await Promise.all(hogs.map(async (id) => (await api.call("GET", `/v1/microvms/${id}`, { key })).body as { state: string; stateReason?: string }));
    for (const vm of ended.filter((v) => v.state === "FAILED")) expect(vm.stateReason).toMatch(/the kernel's OOM killer killed it|the memory guard killed it/);
    expect(await state(innocent)).toBe("RUNNING");
    // A hog left running still holds its memory (its guest did not end it),
    // unless its VM has been ended since, for its memory like the others.
    for (const [i, vm] of ended.entries()) {
      if (vm.state !== "RUNNING") continue;
      const perl = await api.call("POST", `/v1/microvms/${hogs[i]}/exec`, { key, body: { command: PERL_RUNS } });
      if (perl.status === 502 && (await state(hogs[i]!)) === "FAILED") continue;
      expect(perl.body, JSON.stringify(perl.body)).toMatchObject({ exitCode: 0 });
    }
    const exec = await api.call("POST", `/v1/microvms/${innocent}/exec`, { key, body: { command: ["echo", "alive"] } });
    expect(exec.body).toMatchObject({ exitCode: 0, stdout: "alive\n" });
    for (const id of ids) await api.call("DELETE", `/v1/microvms/${id}`, { key });
  }, 280_000);
});
