import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { Cgroups, detectCgroups, GUARD_READINGS, stuckAtCap } from "../../src/vmm/jail/cgroups.ts";
import { vmUidRange } from "../../src/vmm/jail/index.ts";

/** A mountinfo line as the kernel writes it. */
const mountLine = (id: number, point: string, fstype: string, superOptions: string) =>
  `${id} 20 0:${id} / ${point} rw,nosuid,nodev,noexec,relatime shared:${id} - ${fstype} ${fstype} ${superOptions}`;

/** A directory standing in for a cgroup v2 mount: only the files the code reads. */
function fakeV2Root(controllers: string): string {
  const dir = mkdtempSync(join(tmpdir(), "cocoon-cg2-"));
  writeFileSync(join(dir, "cgroup.controllers"), controllers);
  return dir;
}

describe("detectCgroups", () => {
  it("uses cgroup v2 when it holds cpu, memory and pids", () => {
    const root = fakeV2Root("cpuset cpu io memory hugetlb pids rdma misc\n");
    expect(detectCgroups(mountLine(30, root, "cgroup2", "rw,nsdelegate"))).toEqual({
      version: 2,
      mounts: { cpu: root, memory: root, pids: root },
    });
  });

  it("uses the v1 mounts on a hybrid host whose v2 tree has no controllers of ours", () => {
    const root = fakeV2Root("hugetlb\n");
    const mountinfo = [
      mountLine(30, root, "cgroup2", "rw"),
      mountLine(31, "/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
      mountLine(32, "/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
      mountLine(33, "/sys/fs/cgroup/pids", "cgroup", "rw,pids"),
    ].join("\n");
    expect(detectCgroups(mountinfo)).toEqual({
      version: 1,
      mounts: { cpu: "/sys/fs/cgroup/cpu,cpuacct", memory: "/sys/fs/cgroup/memory", pids: "/sys/fs/cgroup/pids" },
    });
  });

  it("names the controllers that are missing", () => {
    expect(() => detectCgroups(mountLine(31, "/sys/fs/cgroup/memory", "cgroup", "rw,memory"))).toThrow(
      "cgroup controllers cpu, pids are not mounted (neither cgroup v2 nor v1): the QEMU jail needs them",
    );
  });

  it("reads this host's layout", () => {
    expect([1, 2]).toContain(detectCgroups().version);
  });
});

describe("Cgroups on v2", () => {
  it("delegates the controllers down the parent, caps all VMs' memory there, and writes cpu.max, cpu.weight, memory.max, swap and pids limits", async () => {
    const root = fakeV2Root("cpu memory pids\n");
    const cgroups = new Cgroups({ version: 2, mounts: { cpu: root, memory: root, pids: root } }, "cocoon", 8 * 1024 ** 3);
    const procs = await cgroups.create("vm-1", { cpus: 2, memoryBytes: 640 * 1024 * 1024, pids: 512, cpuWeight: 200 });
    const vm = join(root, "cocoon", "vm-1");
    expect(procs).toEqual([join(vm, "cgroup.procs")]);
    expect(readFileSync(join(root, "cgroup.subtree_control"), "utf8")).toBe("+cpu +memory +pids");
    expect(readFileSync(join(root, "cocoon", "cgroup.subtree_control"), "utf8")).toBe("+cpu +memory +pids");
    expect(readFileSync(join(vm, "cpu.max"), "utf8")).toBe("200000 100000");
    expect(readFileSync(join(vm, "memory.max"), "utf8")).toBe(String(640 * 1024 * 1024));
    expect(readFileSync(join(vm, "pids.max"), "utf8")).toBe("512");
    expect(readFileSync(join(vm, "cpu.weight"), "utf8")).toBe("200");
    expect(readFileSync(join(root, "cocoon", "memory.max"), "utf8")).toBe(String(8 * 1024 ** 3));
  });
});

describe("vmUidRange", () => {
  it("defaults to a range no account owns and reads COCOON_VM_UIDS", () => {
    expect(vmUidRange({})).toEqual({ first: 0x5c00_0000, count: 0x0100_0000 });
    expect(vmUidRange({ COCOON_VM_UIDS: "200000-265535" })).toEqual({ first: 200000, count: 65536 });
  });

  it("refuses root, system ids and tiny or malformed ranges, naming the variable", () => {
    for (const bad of ["0-100000", "5000-5001", "abc", "300000-200000"]) {
      expect(() => vmUidRange({ COCOON_VM_UIDS: bad })).toThrow(/COCOON_VM_UIDS must be FIRST-LAST/);
    }
  });
});

describe("stuckAtCap (the VMs' memory guard)", () => {
  const MiB = 2 ** 20;
  const reading = (s: number, o: { usageMiB?: number; hits?: number; stalledMs?: number; fileMiB?: number } = {}) => ({
    at: s * 1000,
    usageBytes: (o.usageMiB ?? 399) * MiB,
    limitBytes: 400 * MiB,
    limitHits: o.hits ?? s * 100,
    stallUs: (o.stalledMs ?? s * 800) * 1000,
    fileBytes: (o.fileMiB ?? 60) * MiB,
    mappedFileBytes: 0,
  });
  const series = (f: (s: number) => ReturnType<typeof reading>) => Array.from({ length: GUARD_READINGS }, (_, s) => f(s));

  it("acts when every reading is at the cap, the limit keeps being hit and tasks stall most of the time", () => {
    expect(stuckAtCap(series((s) => reading(s)))).toBe(true);
  });

  it("acts, stalls or not, when the cap holds almost nothing reclaim can free (one VM crawling, seen host-wide on v1)", () => {
    expect(stuckAtCap(series((s) => reading(s, { stalledMs: s * 100, fileMiB: 16 })))).toBe(true);
  });

  it.each([
    ["too few readings", [reading(0), reading(1)]],
    ["little page cache but below the cap once", series((s) => reading(s, { stalledMs: s * 100, fileMiB: 16, usageMiB: s === 1 ? 380 : 399 }))],
    ["below the cap once", series((s) => reading(s, { usageMiB: s === 2 ? 380 : 399 }))],
    ["the limit not hit in one interval", series((s) => reading(s, { hits: s === 2 ? 100 : s * 100 }))],
    ["a cap full of page cache reclaimed without stalls", series((s) => reading(s, { stalledMs: s * 100 }))],
  ])("waits on %s", (_name, readings) => {
    expect(stuckAtCap(readings)).toBe(false);
  });
});
