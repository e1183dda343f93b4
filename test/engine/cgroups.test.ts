import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { afterAll, describe, expect, it } from "vitest";
import { Cgroups, detectCgroups } from "../../src/vmm/jail/cgroups.ts";
import { sleep } from "../../src/util/process.ts";

/*
 * The jail's cgroups on this host's real hierarchy (v1, v2 or hybrid,
 * whichever the kernel has): the limits a VM's QEMU gets are written, read
 * back, and enforced on ordinary processes standing in for QEMU's threads.
 * The jail tests prove the same through a real QEMU; these are small enough
 * to run on a host that has no QEMU (how the v2 path was checked).
 */
const cgroups = new Cgroups(detectCgroups(), "cocoon");
const name = `test-cgroups-${process.pid}`;
const children: ChildProcess[] = [];

/** A shell that joins the cgroup (every hierarchy) before it runs `script`. */
function inCgroup(procs: string[], script: string): ChildProcess {
  const join = procs.map((p) => `echo $$ > ${p}`).join("; ");
  const child = spawn("sh", ["-c", `${join}; ${script}`], { stdio: ["ignore", "ignore", "pipe"] });
  children.push(child);
  return child;
}

const exited = (child: ChildProcess) =>
  new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve) => {
    let stderr = "";
    child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("exit", (code, signal) => resolve({ code, signal, stderr }));
  });

/** CPU seconds a process has used (utime + stime). */
const cpuSeconds = (pid: number) => {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
};

afterAll(async () => {
  for (const c of children) c.kill("SIGKILL");
  await sleep(100);
  await cgroups.remove(name);
});

describe(`the jail's cgroups on this host (v${cgroups.layout.version})`, () => {
  const limits = { cpus: 0.5, memoryBytes: 96 * 1024 * 1024, pids: 16, cpuWeight: 200 };
  let procs: string[];

  it("creates a cgroup whose limits read back as written", async () => {
    procs = await cgroups.create(name, limits);
    expect(procs.every((p) => existsSync(p))).toBe(true);
    expect((await cgroups.read(name)).limits).toEqual(limits);
  });

  it("holds two spinning processes to half a CPU between them", async () => {
    const spinners = [inCgroup(procs, "while :; do :; done"), inCgroup(procs, "while :; do :; done")];
    await sleep(300); // both have joined
    const before = spinners.map((s) => cpuSeconds(s.pid!));
    const started = Date.now();
    await sleep(2000);
    const used = spinners.reduce((sum, s, i) => sum + cpuSeconds(s.pid!) - before[i]!, 0);
    const elapsed = (Date.now() - started) / 1000;
    for (const s of spinners) s.kill("SIGKILL");
    expect(used / elapsed).toBeLessThanOrEqual(limits.cpus * 1.3); // a period's slack (burst) and tick granularity
    expect((await cgroups.read(name)).cpuThrottled).toBeGreaterThan(0);
  });

  it("kills a process that allocates beyond its memory limit", async () => {
    const hog = inCgroup(procs, "head -c 400M /dev/zero | tail");
    const result = await exited(hog);
    expect(result.code === 137 || result.signal === "SIGKILL", JSON.stringify(result)).toBe(true);
    const reading = await cgroups.read(name);
    expect(reading.oomKills).toBeGreaterThan(0);
    expect(reading.memoryBytes).toBeLessThanOrEqual(limits.memoryBytes);
  });

  it("refuses forks beyond its task limit", async () => {
    const forker = inCgroup(procs, "for i in $(seq 40); do sleep 3 & done; wait");
    const result = await exited(forker);
    expect(result.stderr).toMatch(/fork|Resource temporarily unavailable/i);
  });

  it("is removed once its processes are gone", async () => {
    for (const c of children) c.kill("SIGKILL");
    await sleep(3500); // the forker's sleeps end
    await cgroups.remove(name);
    expect(cgroups.dirs(name).some((d) => existsSync(d))).toBe(false);
  });
});
