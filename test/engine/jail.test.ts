import { spawn, spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, readlinkSync, statSync, writeFileSync } from "node:fs";
import { rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { describe, expect, inject, it } from "vitest";
import type { MicroVm } from "../../src/vmm/engine.ts";
import { Jailer, vmUidRange } from "../../src/vmm/jail/index.ts";
import { vmObjects } from "../../src/vmm/network/nft.ts";
import { passtDir } from "../../src/vmm/network/passt.ts";
import { machinePaths, qemuFeatures, qemuOverheadMiB, socketPaths } from "../../src/vmm/qemu.ts";
import { sleep } from "../../src/util/process.ts";
import { useEngine } from "../support/engine-fixture.ts";

/*
 * Each layer of the QEMU jail (SECURITY.md), proven from the host's side:
 * what the kernel reports about the QEMU process, its cgroup, and what its
 * uid can reach. Tests run as root, so the engine jails by default.
 */

const ctx = await useEngine();

const status = (pid: number) => readFileSync(`/proc/${pid}/status`, "utf8");
const statusField = (pid: number, key: string) => new RegExp(`^${key}:[ \\t]*(.*)$`, "m").exec(status(pid))?.[1]?.trim();
const nsOf = (pid: number | "self", ns: string) => readlinkSync(`/proc/${pid}/ns/${ns}`);
const limit = (pid: number, name: string) =>
  new RegExp(`^${name}\\s+(\\S+)\\s+(\\S+)`, "m").exec(readFileSync(`/proc/${pid}/limits`, "utf8"))?.slice(1, 3);

/** Runs a host command as `uid` (no groups, no capabilities): what a process escaped from that VM's QEMU could do. */
function asUid(uid: number, command: string[], opts: { inMountNsOf?: number } = {}) {
  const setpriv = ["setpriv", `--reuid=${uid}`, `--regid=${uid}`, "--clear-groups", "--inh-caps=-all", "--", ...command];
  const argv = opts.inMountNsOf ? ["nsenter", `--mount=/proc/${opts.inMountNsOf}/ns/mnt`, "--", ...setpriv] : setpriv;
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: "utf8" });
  return { code: r.status, output: `${r.stdout}${r.stderr}` };
}

/** CPU seconds a process has used (user + system), all its threads. */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** CPUs used on average by `pids` together over `ms`. */
async function cpuUsedOver(ms: number, pids: number[]): Promise<number> {
  const total = () => pids.reduce((sum, pid) => sum + cpuSeconds(pid), 0);
  const cpu0 = total();
  const t0 = performance.now();
  await sleep(ms);
  return (total() - cpu0) / ((performance.now() - t0) / 1000);
}

function jailer(): Jailer {
  expect(ctx.engine.jailer, "tests run as root: the engine must jail QEMU").toBeDefined();
  return ctx.engine.jailer!;
}

describe("a jailed QEMU process", () => {
  it("runs as its VM's own uid, with no capabilities, no_new_privs and QEMU's seccomp filter", async () => {
    const [a, b] = await Promise.all([ctx.engine.launch(ctx.snapshot, { id: "vm-jail-a" }), ctx.engine.launch(ctx.snapshot, { id: "vm-jail-b" })]);
    const range = vmUidRange();
    for (const vm of [a!, b!]) {
      const pid = vm.record.pid!;
      const uid = vm.record.uid;
      expect(uid).toBeGreaterThanOrEqual(range.first);
      expect(uid).toBeLessThan(range.first + range.count);
      expect(statusField(pid, "Uid")).toBe(`${uid}\t${uid}\t${uid}\t${uid}`);
      expect(statusField(pid, "Gid")).toBe(`${uid}\t${uid}\t${uid}\t${uid}`);
      expect(statusField(pid, "Groups")).toBe("");
      expect(statusField(pid, "CapEff")).toBe("0000000000000000");
      expect(statusField(pid, "CapPrm")).toBe("0000000000000000");
      expect(statusField(pid, "CapBnd")).toBe("0000000000000000");
      expect(statusField(pid, "NoNewPrivs")).toBe("1");
      expect(statusField(pid, "Seccomp")).toBe("2"); // filter mode
    }
    expect(a!.record.uid).not.toBe(b!.record.uid);
  });

  it("has mount and PID namespaces of its own, with a root holding only what it needs", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot, { id: "vm-jail-ns" });
    const other = await ctx.engine.launch(ctx.snapshot, { id: "vm-jail-ns2" });
    const pid = vm.record.pid!;
    for (const ns of ["mnt", "pid"]) {
      expect(nsOf(pid, ns)).not.toBe(nsOf("self", ns));
      expect(nsOf(pid, ns)).not.toBe(nsOf(other.record.pid!, ns));
    }
    // Inside, QEMU is PID 1 of its namespace.
    expect(statusField(pid, "NSpid")).toBe(`${pid}\t1`);

    const root = `/proc/${pid}/root`;
    const inJail = (p: string) => existsSync(join(root, p));
    expect(readdirSync(join(root, "dev")).sort()).toEqual(["null", "urandom", "zero"]);
    expect(inJail("etc")).toBe(false);
    expect(inJail("root")).toBe(false);
    expect(inJail("proc/self")).toBe(false);
    // Its own disk is there; its record, console, other VMs and the server's data are not.
    expect(inJail(join(vm.dir, "disk.qcow2"))).toBe(true);
    // Its socket directory is there (a save's socket is made in it), but the QMP socket is root's alone.
    const connect = `import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])`;
    expect(asUid(vm.record.uid, ["/usr/bin/python3", "-c", connect, socketPaths(vm.record.processName).qmp], { inMountNsOf: pid }).output).toMatch(/Permission denied/);
    expect(inJail(machinePaths(vm.dir).console)).toBe(false);
    // A restored QEMU never reads the boot files (only a cold boot is given them): not in its jail.
    expect(inJail(ctx.snapshot.manifest.kernel)).toBe(false);
    expect(inJail(ctx.snapshot.manifest.initramfs)).toBe(false);
    expect(readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0")).not.toContain("-kernel");
    expect(inJail(join(vm.dir, "vm.json"))).toBe(false);
    expect(inJail(other.dir)).toBe(false);
    expect(readdirSync(join(root, ctx.dataDir, "vms"))).toEqual([vm.id]);
    // /usr is there to run QEMU, read-only.
    expect(asUid(vm.record.uid, ["touch", "/usr/jail-write-test"], { inMountNsOf: pid }).output).toMatch(/Read-only file system/);
    // So is its image's memory file where QEMU can map it from a read-only open (SECURITY.md): no clone
    // changes what the others map. (QEMU 7.2 opens it read-write: mode 0666, the gap SECURITY.md states.)
    const memory = join(ctx.snapshot.dir, "memory");
    if (qemuFeatures().readOnlyPrivateMapping) {
      expect(statSync(memory).mode & 0o777).toBe(0o444);
      expect(asUid(vm.record.uid, ["sh", "-c", `echo x >> ${memory}`], { inMountNsOf: pid }).output).toMatch(/Permission denied/);
      // Mounted read-only as well: the mount table's options for it begin with "ro".
      const mount = readFileSync(`/proc/${pid}/mountinfo`, "utf8").split("\n").map((l) => l.split(" ")).find((f) => f[4] === memory);
      expect(mount?.[5]).toMatch(/^ro,/);
    } else {
      expect(statSync(memory).mode & 0o777).toBe(0o666);
    }
  });

  it("starts with a clean environment, no inherited descriptors, and rlimits", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot, { id: "vm-jail-fds" });
    const pid = vm.record.pid!;
    expect(readFileSync(`/proc/${pid}/environ`, "utf8").split("\0").filter(Boolean)).toEqual(["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]);

    const config = jailer().config;
    expect(limit(pid, "Max open files")).toEqual([String(config.maxOpenFiles), String(config.maxOpenFiles)]);
    expect(limit(pid, "Max file size")).toEqual([String(config.maxFileBytes), String(config.maxFileBytes)]);
    expect(limit(pid, "Max processes")).toEqual([String(config.maxTasks), String(config.maxTasks)]);
    expect(limit(pid, "Max core file size")).toEqual(["0", "0"]);

    // Every descriptor is stdio, one the server handed over (console, QMP), or one QEMU opened itself for this VM.
    const paths = machinePaths(vm.dir);
    const snapshotFiles = [join(ctx.snapshot.dir, "memory"), join(ctx.snapshot.dir, "disk.qcow2")];
    const fds = Object.fromEntries(readdirSync(`/proc/${pid}/fd`).map((fd) => [fd, readlinkSync(`/proc/${pid}/fd/${fd}`)]));
    expect(fds["0"]).toBe("/dev/null");
    expect(fds["1"]).toBe(paths.log);
    expect(fds["2"]).toBe(paths.log);
    expect(Object.values(fds)).toContain(paths.console);
    for (const [fd, target] of Object.entries(fds)) {
      const expected =
        /^(socket|anon_inode):/.test(target) ||
        target === "/dev/null" ||
        [paths.log, paths.console, join(vm.dir, "disk.qcow2")].includes(target) ||
        snapshotFiles.includes(target) ||
        ctx.snapshot.manifest.diskBacking.includes(target);
      expect(expected, `fd ${fd} → ${target}`).toBe(true);
    }
  });

  it("is in a cgroup capping CPU at its vCPUs and memory at its RAM, each plus QEMU's overhead, weighted by its vCPUs, under a parent capping all VMs' memory", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot, { id: "vm-jail-cg" });
    const reading = await jailer().readCgroup(vm.id);
    expect(reading.limits).toEqual({
      cpus: vm.record.vcpus + jailer().config.cpuHeadroom,
      memoryBytes: (vm.record.memoryMiB + qemuOverheadMiB(ctx.engine.accelerator)) * 1024 * 1024,
      pids: jailer().config.maxTasks,
      cpuWeight: 100 * vm.record.vcpus,
    });
    const parent = dirname(jailer().cgroupDirs(vm.id).find((d) => existsSync(join(d, "memory.max")) || existsSync(join(d, "memory.limit_in_bytes")))!);
    const parentLimit = existsSync(join(parent, "memory.max")) ? join(parent, "memory.max") : join(parent, "memory.limit_in_bytes");
    expect(Number(readFileSync(parentLimit, "utf8"))).toBe(jailer().config.vmMemoryBytes);
    const cgroups = readFileSync(`/proc/${vm.record.pid}/cgroup`, "utf8");
    expect(cgroups).toMatch(new RegExp(`(memory|^0:):/cocoon/${vm.id}$`, "m"));
    expect(cgroups).toMatch(new RegExp(`(cpu|^0:):/cocoon/${vm.id}$`, "m"));
    for (const dir of jailer().cgroupDirs(vm.id)) {
      expect(readFileSync(join(dir, "cgroup.procs"), "utf8").trim().split("\n")).toEqual([String(vm.record.pid)]);
    }
  });

  it("keeps its jail across suspend and resume, and leaves no cgroup or jail files after terminate", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot, { id: "vm-jail-life" });
    const uid = vm.record.uid;
    const dirs = jailer().cgroupDirs(vm.id);
    expect(dirs.every((d) => existsSync(d))).toBe(true);
    await ctx.engine.suspend(vm.id);
    expect(dirs.some((d) => existsSync(d))).toBe(false);
    expect(existsSync(Jailer.dir(vm.dir))).toBe(false);
    await ctx.engine.resume(vm.id);
    expect(vm.record.uid).toBe(uid);
    expect(statusField(vm.record.pid!, "Uid")?.split("\t")[0]).toBe(String(uid));
    expect(dirs.every((d) => existsSync(d))).toBe(true);
    // The saved state was read from a descriptor QEMU closed when the restore completed.
    const descriptors = readdirSync(`/proc/${vm.record.pid}/fd`).map((fd) => readlinkSync(`/proc/${vm.record.pid}/fd/${fd}`));
    const own = [join(vm.dir, "disk.qcow2"), machinePaths(vm.dir).console, machinePaths(vm.dir).log];
    expect(descriptors.filter((d) => d.startsWith(`${vm.dir}/`) && !own.includes(d))).toEqual([]);

    // A restarted server re-adopts the jailed VM and can still end it cleanly.
    const pid = vm.record.pid!;
    const engine = await ctx.reopen();
    const adopted = engine.get(vm.id);
    expect(adopted.status).toBe("running");
    expect(adopted.record.pid).toBe(pid);
    expect((await adopted.agent.exec({ command: ["true"] })).exitCode).toBe(0);
    await engine.terminate(vm.id);
    expect(existsSync(`/proc/${pid}`)).toBe(false);
    expect(dirs.some((d) => existsSync(d))).toBe(false);
    expect(existsSync(vm.dir)).toBe(false);
  });

  it("a restarted server ends a template VM an earlier one left mid-build: its QEMU, jail and network", async () => {
    const dir = join(ctx.dataDir, "left-mid-build");
    const template = await ctx.engine.bootTemplate({ dir, backingDisk: inject("rootfs"), vcpus: 1, memoryMiB: 256 });
    const { pid } = template.machine;
    const name = template.spec.name;
    expect(readdirSync(join(ctx.dataDir, "templates"))).toEqual([`${name}.json`]);
    expect(await vmObjects(template.uid)).not.toEqual([]);
    template.agent.close();

    await ctx.reopen(); // a restarted server: the template was never handed to it
    try {
      expect(existsSync(`/proc/${pid}`)).toBe(false);
      expect(jailer().cgroupDirs(name).some((d) => existsSync(d))).toBe(false);
      expect(existsSync(join(dir, "jail"))).toBe(false);
      expect(await vmObjects(template.uid)).toEqual([]);
      expect(existsSync(passtDir(template.uid))).toBe(false);
      expect(readdirSync(join(ctx.dataDir, "templates"))).toEqual([]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("cannot read another VM's disk, saved memory or image files, on the host or from inside its jail", async () => {
    const a = await ctx.engine.launch(ctx.snapshot, { id: "vm-jail-x" });
    const b = await ctx.engine.launch(ctx.snapshot, { id: "vm-jail-y" });
    await b.agent.exec({ command: "echo secret > /root/b-secret; sync" });
    await ctx.engine.suspend(b.id);
    const targets = [
      join(b.dir, "disk.qcow2"),
      join(b.dir, "suspended.state"),
      join(b.dir, "vm.json"),
      join(ctx.snapshot.dir, "memory"),
    ];
    for (const target of targets) {
      expect(existsSync(target), target).toBe(true);
      expect(asUid(a.record.uid, ["cat", target]).output, `host: ${target}`).toMatch(/Permission denied/);
    }
    // Inside A's jail, B's files do not exist (the image's files are A's own, mounted for it).
    for (const target of targets.slice(0, 3)) {
      expect(asUid(a.record.uid, ["cat", target], { inMountNsOf: a.record.pid! }).output, `jail: ${target}`).toMatch(/No such file or directory/);
    }
    // Nor another running VM's files: B resumed (new jail, same uid) is still out of reach.
    await ctx.engine.resume(b.id);
    expect(asUid(a.record.uid, ["cat", join(b.dir, "disk.qcow2")]).output).toMatch(/Permission denied/);
    expect(asUid(a.record.uid, ["ls", b.dir]).output).toMatch(/Permission denied/);
  });

  it("never follows a path the VM's uid can write: planted links and a rewritten disk header are ignored", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot, { id: "vm-jail-plant" });
    const uid = vm.record.uid;
    const canary = join(ctx.dataDir, "canary");
    writeFileSync(canary, "host secret\n", { mode: 0o644 });
    // The VM's uid can write nothing in its directory but its disk: no link can be planted beside the files the server opens.
    // Not on the host, nor inside its jail, where an escaped QEMU would be.
    for (const path of [machinePaths(vm.dir).console, machinePaths(vm.dir).log, socketPaths(vm.record.processName).qmp, socketPaths(vm.record.processName).migration]) {
      expect(asUid(uid, ["ln", "-sf", canary, path]).output, path).toMatch(/Permission denied/);
      expect(asUid(uid, ["ln", "-sf", canary, path], { inMountNsOf: vm.record.pid! }).output, path).toMatch(/Permission denied|Read-only/);
    }
    // What it can write, its disk, gets a header naming the canary as its backing file (as an escaped QEMU could).
    const rewrite = asUid(uid, ["/usr/bin/python3", "-c", REWRITE_BACKING, join(vm.dir, "disk.qcow2"), canary], { inMountNsOf: vm.record.pid! });
    expect(rewrite.code, rewrite.output).toBe(0);
    expect(readFileSync(join(vm.dir, "disk.qcow2")).includes(Buffer.from(canary))).toBe(true);

    await ctx.engine.suspend(vm.id);
    await ctx.engine.resume(vm.id);
    expect((await vm.agent.exec({ command: "echo alive" })).stdout).toBe("alive\n");
    const pid = vm.record.pid!;
    // The new jail mounts only the manifest's chain, and QEMU opened no such file.
    expect(readFileSync(join(Jailer.dir(vm.dir), "fstab"), "utf8")).not.toContain(canary);
    const opened = readdirSync(`/proc/${pid}/fd`).map((fd) => readlinkSync(`/proc/${pid}/fd/${fd}`));
    expect(opened).not.toContain(canary);
    expect(readFileSync(canary, "utf8")).toBe("host secret\n");
  });
});

/**
 * Rewrites a qcow2 header's backing file name in place (argv: disk, new name):
 * the name goes where the old one was, and the header's length field follows.
 */
const REWRITE_BACKING = `
import struct, sys
disk, name = sys.argv[1], sys.argv[2].encode()
with open(disk, "r+b") as f:
    header = f.read(20)
    offset, = struct.unpack(">Q", header[8:16])
    size, = struct.unpack(">I", header[16:20])
    assert offset and len(name) <= size, (offset, size, len(name))
    f.seek(offset); f.write(name)
    f.seek(16); f.write(struct.pack(">I", len(name)))
`;

describe("a guest that uses more than it was given", () => {
  /** A VM that answers exec promptly is responsive (generous bound: TCG on a shared host). */
  async function responsive(vm: MicroVm): Promise<boolean> {
    const t = Date.now();
    await vm.agent.exec({ command: ["true"] });
    return Date.now() - t < 10_000;
  }

  it("spinning all its vCPUs is held to its CPU quota while another VM stays responsive", async () => {
    const [spinner, bystander] = await Promise.all([
      ctx.engine.launch(ctx.snapshot, { id: "vm-jail-spin" }),
      ctx.engine.launch(ctx.snapshot, { id: "vm-jail-calm" }),
    ]);
    const vcpus = spinner.record.vcpus;
    await spinner.agent.exec({
      command: `for i in $(seq ${vcpus}); do nohup timeout 20 sh -c 'while :; do :; done' >/dev/null 2>&1 & done`,
    });
    const pid = spinner.record.pid!;
    const used = await cpuUsedOver(3000, [pid]);
    const quota = (await jailer().readCgroup(spinner.id)).limits.cpus;
    expect(quota).toBe(vcpus + jailer().config.cpuHeadroom);
    expect(used).toBeLessThanOrEqual(quota * 1.1);
    expect(await responsive(bystander)).toBe(true);
    expect(await responsive(spinner)).toBe(true);
    await ctx.engine.terminate(spinner.id);
    expect(existsSync(`/proc/${pid}`)).toBe(false);
  });

  it("a process that escaped into the VM's QEMU cannot take more CPU than the quota, however many threads it runs", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot, { id: "vm-jail-escape" });
    const before = await jailer().readCgroup(vm.id);
    // Stand-ins for an escaped QEMU's extra threads: spinners in the VM's cgroup (the host has 2+ cores to take).
    const spinners = Array.from({ length: 3 }, () => spawn("sh", ["-c", "while :; do :; done"], { stdio: "ignore" }));
    try {
      for (const s of spinners) for (const dir of jailer().cgroupDirs(vm.id)) writeFileSync(join(dir, "cgroup.procs"), String(s.pid));
      const used = await cpuUsedOver(3000, [vm.record.pid!, ...spinners.map((s) => s.pid!)]);
      const after = await jailer().readCgroup(vm.id);
      // On an idle host the three would take every core; the quota holds them to its CPUs
      // (on a busy host they get less anyway, so the kernel's throttle count is not asserted).
      expect(used).toBeLessThanOrEqual(after.limits.cpus * 1.1);
      expect(after.cpuPeriods).toBeGreaterThan(before.cpuPeriods);
    } finally {
      for (const s of spinners) s.kill("SIGKILL");
    }
    expect((await vm.agent.exec({ command: ["true"] })).exitCode).toBe(0);
  });

  it("allocating far beyond its memory stays under its cgroup's memory cap, and the VM lives on", async () => {
    const [hog, bystander] = await Promise.all([
      ctx.engine.launch(ctx.snapshot, { id: "vm-jail-hog" }),
      ctx.engine.launch(ctx.snapshot, { id: "vm-jail-quiet" }),
    ]);
    const pid = hog.record.pid!;
    // `tail` keeps a newline-free stream in memory: twice the guest's RAM. At the workload's limit the
    // pipeline thrashes without the guest's OOM killer acting; the agent's memory watchdog ends it.
    const r = await hog.agent.exec({
      command: ["bash", "-c", `set -o pipefail; head -c ${2 * hog.record.memoryMiB}M /dev/zero | tail | wc -c`],
      timeoutMs: 90_000,
    });
    expect(r).toMatchObject({ timedOut: false, exitCode: 137 });
    // Inside the guest, its own limits ended the hog: the agent's watchdog (which says so on the console,
    // drained through the emulated UART after the exec's answer) or, when reclaim falls behind (a busier
    // host), the workload cgroup's OOM killer first (counted in its memory.events).
    const killed = /memwatch: killed pid \d+ \(tail, \d+ MiB resident\)/;
    for (let i = 0; i < 50 && !killed.test(readFileSync(machinePaths(hog.dir).console, "utf8")); i++) await sleep(100);
    const events = (await hog.agent.exec({ command: ["cat", "/sys/fs/cgroup/cocoon-workload/memory.events"] })).stdout;
    const guestOomKills = Number(/^oom_kill (\d+)$/m.exec(events)?.[1] ?? 0);
    expect(killed.test(readFileSync(machinePaths(hog.dir).console, "utf8")) || guestOomKills > 0, `watchdog line or a guest OOM kill; memory.events:\n${events}`).toBe(true);
    const reading = await jailer().readCgroup(hog.id);
    const peakBytes = Number(statusField(pid, "VmHWM")?.replace(" kB", "")) * 1024;
    expect(peakBytes).toBeLessThanOrEqual(reading.limits.memoryBytes);
    expect(reading.memoryBytes).toBeLessThanOrEqual(reading.limits.memoryBytes);
    expect(existsSync(`/proc/${pid}`)).toBe(true);
    expect(await responsive(hog)).toBe(true);
    expect(await responsive(bystander)).toBe(true);
  });
});
