import { spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { link, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, inject, it } from "vitest";
import { InvalidArgumentError, SnapshotIncompatibleError } from "../../src/errors.ts";
import { Engine } from "../../src/vmm/engine.ts";
import { qemuFeatures, socketPaths } from "../../src/vmm/qemu.ts";
import { isAlive, processArgv } from "../../src/util/process.ts";
import { engineConfig, useEngine } from "../support/engine-fixture.ts";
import { TEST_ROOT } from "../support/paths.ts";

const ctx = await useEngine();

/** A background loop whose only state is in memory: it counts, and prints the count when asked. */
const COUNTER = `nohup sh -c ': cocoon-counter; i=0; trap "echo \\$i > /tmp/count" USR1; while :; do i=$((i+1)); sleep 0.05; done' >/dev/null 2>&1 & echo $!`;

async function readCounter(vm: Awaited<ReturnType<Engine["launch"]>>, pid: string): Promise<number> {
  await vm.agent.exec({ command: `rm -f /tmp/count; kill -USR1 ${pid}; while [ ! -s /tmp/count ]; do sleep 0.05; done` });
  return Number((await vm.agent.exec({ command: ["cat", "/tmp/count"] })).stdout);
}

/**
 * Runs `script` (an engine over `config` on the base snapshot) as a server
 * of its own, waits for the first JSON line it prints, then kills it with
 * SIGKILL and returns that line.
 */
async function serverKilledAfter<T>(script: string, config: object): Promise<T> {
  const server = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
    env: { ...process.env, CONFIG: JSON.stringify(config), SNAPSHOT: inject("baseSnapshotDir") },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const said = await new Promise<T>((resolve, reject) => {
    server.stdout.on("data", (d: Buffer) => resolve(JSON.parse(d.toString()) as T));
    server.on("exit", (code) => reject(new Error(`server exited with ${code}`)));
  });
  server.kill("SIGKILL");
  return said;
}

/** Live processes whose command line mentions `dir` (a VM's QEMU names its files there). */
function qemuProcessesOf(dir: string): number[] {
  return readdirSync("/proc")
    .filter((n) => /^\d+$/.test(n))
    .map(Number)
    .filter((pid) => isAlive(pid) && processArgv(pid)?.some((a) => a.includes(dir)));
}

describe("clones of one snapshot", () => {
  it("are independent: a file or in-memory counter in one is absent in the other", async () => {
    const [a, b] = await Promise.all([ctx.engine.launch(ctx.snapshot), ctx.engine.launch(ctx.snapshot)]);
    await a!.agent.writeFile("/root/only-in-a", Buffer.from("a"));
    const pid = (await a!.agent.exec({ command: COUNTER })).stdout.trim();
    expect(await readCounter(a!, pid)).toBeGreaterThan(0);

    expect((await b!.agent.exec({ command: "test -e /root/only-in-a" })).exitCode).toBe(1);
    // Clones share pid numbering, so look for the counter by its marker, not its pid.
    const counters = (vm: typeof a) => vm!.agent.exec({ command: "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -c 'cocoon-count[e]r'" });
    expect((await counters(a)).stdout.trim()).toBe("1");
    expect((await counters(b)).stdout.trim()).toBe("0");
    // Each clone is made unique on restore: its own hostname, machine-id and RNG output.
    const ids = await Promise.all([a!, b!].map((vm) => vm.agent.exec({ command: "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1" })));
    expect(ids[0]!.stdout).not.toBe(ids[1]!.stdout);
    expect(ids[0]!.stdout.split("\n")[0]).toBe(a!.id);
  });

  it("idle without the wakeups they do not need: no proactive compaction, no PIT (under TCG)", async () => {
    const vm = (await ctx.engine.launch(ctx.snapshot))!;
    const res = await vm.agent.exec({ command: "cat /proc/sys/vm/compaction_proactiveness" });
    expect(res.stdout.trim()).toBe("0");
    if (ctx.engine.accelerator === "tcg") expect(processArgv(vm.machine!.pid)!.join(" ")).toContain(",pit=off,");
  });
});

describe("suspend and resume", () => {
  it("keep a running process's memory, its open files and disk writes", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    const pid = (await vm.agent.exec({ command: COUNTER })).stdout.trim();
    // A process holding a file open and appending to it through that descriptor.
    // The fifo exists before the reader starts: a reader that finds none ends, and the write then waits forever.
    await vm.agent.exec({ command: `mkfifo /tmp/fifo; nohup sh -c 'exec 3>>/root/journal; while read line < /tmp/fifo; do echo "$line" >&3; done' >/dev/null 2>&1 & echo first > /tmp/fifo` });
    await vm.agent.writeFile("/root/disk-write", Buffer.from("persisted"));
    const before = await readCounter(vm, pid);
    const machineId = (await vm.agent.exec({ command: ["cat", "/etc/machine-id"] })).stdout;
    expect(machineId).toMatch(/^[0-9a-f]{32}\n$/);

    await ctx.engine.suspend(vm.id);
    expect(vm.status).toBe("suspended");
    expect(qemuProcessesOf(vm.dir)).toEqual([]);
    expect((await stat(join(vm.dir, "suspended.state"))).size).toBeGreaterThan(0);

    await ctx.engine.resume(vm.id);
    expect(vm.status).toBe("running");
    const after = await readCounter(vm, pid);
    expect(after).toBeGreaterThanOrEqual(before);
    await vm.agent.exec({ command: "echo second > /tmp/fifo" });
    await vm.agent.exec({ command: "sleep 0.2" });
    expect((await vm.agent.exec({ command: ["cat", "/root/journal"] })).stdout).toBe("first\nsecond\n");
    expect((await vm.agent.exec({ command: ["cat", "/root/disk-write"] })).stdout).toBe("persisted");
    // The same machine resumed: its machine-id is kept (a launch or a fork child gets a new one).
    expect((await vm.agent.exec({ command: ["cat", "/etc/machine-id"] })).stdout).toBe(machineId);
  });

  it.each([
    { what: "another QEMU build", change: { qemuBuild: "QEMU emulator version 1.0 (retired)" }, says: "was suspended by a QEMU build this host no longer runs", action: "terminate it, or resume it on a host running the build that suspended it" },
    { what: "an older snapshot format (the machine had the i8254 PIT before format 5)", change: { formatVersion: 4 }, says: "was suspended by an older Cocoon whose machine layout this server no longer restores", action: "terminate it, or resume it with the Cocoon version that suspended it" },
  ])("refuse to resume a VM suspended under $what, saying what to do, and keep it suspended", async ({ change, says, action }) => {
    // A snapshot of its own (hard links, a manifest of its own), whose recorded build or format then "changes" as after an upgrade.
    const dir = await mkdtemp(join(TEST_ROOT, "other-build-"));
    try {
      for (const name of await readdir(ctx.snapshot.dir)) await link(join(ctx.snapshot.dir, name), join(dir, name));
      const manifestPath = join(dir, "manifest.json");
      const manifest = JSON.parse(await readFile(manifestPath, "utf8")) as Record<string, unknown>;
      await rm(manifestPath);
      await writeFile(manifestPath, JSON.stringify(manifest));
      const vm = await ctx.engine.launch(await ctx.engine.loadSnapshot(dir));
      await ctx.engine.suspend(vm.id);
      await rm(manifestPath);
      await writeFile(manifestPath, JSON.stringify({ ...manifest, ...change }));
      const refused = await ctx.engine.resume(vm.id).catch((err: unknown) => err);
      expect(refused).toBeInstanceOf(SnapshotIncompatibleError);
      expect((refused as SnapshotIncompatibleError).message).toContain(`microVM ${vm.id} ${says}`);
      expect((refused as SnapshotIncompatibleError).action).toBe(action);
      expect(vm.status).toBe("suspended");
      expect((await stat(join(vm.dir, "suspended.state"))).size).toBeGreaterThan(0);
      await ctx.engine.terminate(vm.id);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("refuse a second suspend or a resume of a running VM with the states named", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    await expect(ctx.engine.resume(vm.id)).rejects.toThrow(`cannot resume microVM ${vm.id}: it is running`);
    await Promise.all([ctx.engine.suspend(vm.id), expect(ctx.engine.suspend(vm.id)).rejects.toThrow("it is suspended")]);
  });
});

describe("pause and unpause", () => {
  it("stop the guest's vCPUs without ending the process, then let it run on", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    const pid = (await vm.agent.exec({ command: COUNTER })).stdout.trim();
    const before = await readCounter(vm, pid);
    await ctx.engine.pause(vm.id);
    expect(vm.status).toBe("paused");
    const cpu = () => Number(readFileSync(`/proc/${vm.machine!.pid}/stat`, "utf8").split(") ")[1]!.split(" ")[11]);
    const t0 = cpu();
    await new Promise((r) => setTimeout(r, 1000));
    // A paused guest burns (almost) no CPU: at most a few ticks of QEMU's own housekeeping.
    expect(cpu() - t0).toBeLessThan(10);
    await expect(vm.agent.json("GET", "/health", { signal: AbortSignal.timeout(500) })).rejects.toThrow();
    await expect(ctx.engine.pause(vm.id)).rejects.toThrow("it is paused");
    await ctx.engine.unpause(vm.id);
    expect(await readCounter(vm, pid)).toBeGreaterThan(before);
  });
});

describe("terminate", () => {
  it("leaves no process, socket or file behind", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    const pid = vm.machine!.pid;
    await ctx.engine.terminate(vm.id);
    expect(isAlive(pid)).toBe(false);
    expect(qemuProcessesOf(vm.dir)).toEqual([]);
    expect(await readdir(join(ctx.dataDir, "vms"))).toEqual([]);
    expect(() => ctx.engine.get(vm.id)).toThrow("not found");
  });

  it("also cleans up a suspended VM", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    await ctx.engine.suspend(vm.id);
    await ctx.engine.terminate(vm.id);
    expect(await readdir(join(ctx.dataDir, "vms"))).toEqual([]);
  });
});

describe("server restart", () => {
  it("re-adopts running and suspended VMs after the server is killed with SIGKILL", async () => {
    // A separate server process launches two VMs, suspends one, and is killed.
    const script = `
      import { Engine } from "./src/vmm/engine.ts";
      const config = JSON.parse(process.env.CONFIG);
      const engine = await Engine.open(config);
      const snapshot = await engine.loadSnapshot(process.env.SNAPSHOT);
      const a = await engine.launch(snapshot);
      await a.agent.writeFile("/root/marker", Buffer.from("from-a"));
      const b = await engine.launch(snapshot);
      await engine.suspend(b.id);
      console.log(JSON.stringify({ running: a.id, suspended: b.id }));
      setInterval(() => {}, 1000);
    `;
    const ids = await serverKilledAfter<{ running: string; suspended: string }>(script, engineConfig(ctx.dataDir));

    const engine = await ctx.reopen();
    const running = engine.get(ids.running);
    expect(running.status).toBe("running");
    expect((await running.agent.exec({ command: ["cat", "/root/marker"] })).stdout).toBe("from-a");
    expect(engine.get(ids.suspended).status).toBe("suspended");
    await engine.resume(ids.suspended);
    expect((await engine.get(ids.suspended).agent.exec({ command: "echo back" })).stdout).toBe("back\n");
  });

  it("marks a VM failed, with the reason, when its QEMU process dies", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    const exited = new Promise((resolve) => ctx.engine.once("exit", resolve));
    process.kill(vm.machine!.pid, "SIGKILL");
    await exited;
    expect(vm.status).toBe("failed");
    expect(vm.record.failureReason).toContain("QEMU process exited unexpectedly");
    // …and the record survives a restart.
    const engine = await ctx.reopen();
    expect(engine.get(vm.id).status).toBe("failed");
  });
});

describe("bad input", () => {
  it("names the missing snapshot", async () => {
    await expect(ctx.engine.loadSnapshot(join(TEST_ROOT, "no-such-image"))).rejects.toThrow(/no complete snapshot in .*no-such-image/);
  });

  it("names the field and the limit for invalid sizes", async () => {
    const dir = join(ctx.dataDir, "never");
    const backingDisk = inject("rootfs");
    await expect(ctx.engine.bootTemplate({ dir, backingDisk, vcpus: 0, memoryMiB: 512 })).rejects.toThrow(
      "vcpus must be an integer between 1 and 16, got 0",
    );
    await expect(ctx.engine.bootTemplate({ dir, backingDisk, vcpus: 1, memoryMiB: 64 })).rejects.toThrow(
      "memoryMiB must be an integer between 128 and 32768, got 64",
    );
    await expect(ctx.engine.bootTemplate({ dir, backingDisk: "/nope.qcow2", vcpus: 1, memoryMiB: 256 })).rejects.toBeInstanceOf(
      InvalidArgumentError,
    );
  });

  it("refuses operations on an unknown VM", async () => {
    await expect(ctx.engine.suspend("vm-doesnotexist")).rejects.toThrow("microVM vm-doesnotexist not found");
  });
});

describe("warm pool", () => {
  it("hands out a restored, re-keyed VM and keeps pool VMs out of sight", async () => {
    const dataDir = join(ctx.dataDir, "..", `${ctx.dataDir.split("/").pop()}-pool`);
    const engine = await Engine.open({ ...engineConfig(dataDir), warmPoolSize: 1 });
    try {
      await engine.prewarm(ctx.snapshot);
      expect(engine.list()).toEqual([]);
      const [pooledDir] = await readdir(join(dataDir, "vms"));
      const vm = await engine.launch(ctx.snapshot);
      expect(vm.id).toBe(pooledDir);
      expect(engine.list().map((v) => v.id)).toEqual([vm.id]);
      const identity = await vm.agent.exec({ command: "hostname" });
      expect(identity.stdout.trim()).toBe(vm.id);
      // The pool refills in the background; the next VM is a different one.
      await engine.prewarm(ctx.snapshot);
      const next = await engine.launch(ctx.snapshot);
      expect(next.id).not.toBe(vm.id);
      await engine.terminate(vm.id);
      await engine.terminate(next.id);
      // A burst: launches that find the pool empty wait for its restores, each
      // gets a VM of its own, and the pool grows to meet the next burst.
      const burst = await Promise.all([1, 2, 3].map(() => engine.launch(ctx.snapshot)));
      expect(new Set(burst.map((v) => v.id)).size).toBe(3);
      for (const v of burst) expect((await v.agent.exec({ command: "hostname" })).stdout.trim()).toBe(v.id);
      await engine.prewarm(ctx.snapshot);
      const pooled = (await readdir(join(dataDir, "vms"))).filter((d) => !burst.some((v) => v.dir.endsWith(`/${d}`)));
      expect(pooled.length).toBeGreaterThanOrEqual(3);
      for (const v of burst) await engine.terminate(v.id);
    } finally {
      await engine.prewarm(ctx.snapshot);
      await engine.close();
    }
    // Closing discards the warm VMs: nothing is left running or on disk.
    expect(await readdir(join(dataDir, "vms"))).toEqual([]);
    expect(qemuProcessesOf(dataDir)).toEqual([]);
  });
});

describe("pre-started processes", () => {
  /** The pre-started process's QEMU pid once the engine holds one ready. */
  async function prestartedPid(engine: Engine): Promise<number> {
    for (;;) {
      const pid = engine.pooledPids().find((p) => p !== undefined);
      if (pid) return pid;
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  it("launch in a process started ahead, are discarded after a SIGKILL of the server and released on shutdown", async () => {
    const dataDir = join(ctx.dataDir, "..", `${ctx.dataDir.split("/").pop()}-prestart`);
    const config = { ...engineConfig(dataDir), prestartedProcesses: 1 };
    // A server whose launch leaves a process pre-started for the next one, killed with SIGKILL.
    const script = `
      import { Engine } from "./src/vmm/engine.ts";
      const engine = await Engine.open(JSON.parse(process.env.CONFIG));
      const snapshot = await engine.loadSnapshot(process.env.SNAPSHOT);
      const vm = await engine.launch(snapshot);
      for (;;) {
        const pid = engine.pooledPids().find((p) => p !== undefined);
        if (pid) { console.log(JSON.stringify({ vm: vm.id, prestarted: pid })); break; }
        await new Promise((r) => setTimeout(r, 50));
      }
      setInterval(() => {}, 1000);
    `;
    const killed = await serverKilledAfter<{ vm: string; prestarted: number }>(script, config);
    expect(isAlive(killed.prestarted)).toBe(true);

    const engine = await Engine.open(config);
    try {
      // Adoption discards it (recorded pooled): its process, directory and cgroup are gone; the launched VM runs on.
      expect(isAlive(killed.prestarted)).toBe(false);
      expect(await readdir(join(dataDir, "vms"))).toEqual([killed.vm]);
      expect(engine.get(killed.vm).status).toBe("running");
      await engine.terminate(killed.vm);

      // The first launch finds none and starts one; the next, with a port of its own, restores in it.
      await engine.launch(ctx.snapshot).then((vm) => engine.terminate(vm.id));
      const pid = await prestartedPid(engine);
      const vm = await engine.launch(ctx.snapshot, { guestPorts: [8080] });
      expect(vm.machine!.pid).toBe(pid);
      // The agent answers through its port forward, bound only when the process was taken.
      expect((await vm.agent.exec({ command: "hostname" })).stdout.trim()).toBe(vm.id);
      expect(vm.hostPort(8080)).toBeGreaterThan(0);
      // Its CPU share is its vCPUs' again (a pre-start runs at the lowest).
      expect((await engine.jailer?.readCgroup(vm.record.processName))?.limits.cpuWeight ?? 100).toBe(100 * vm.record.vcpus);
      // A VM like any other: it keeps a running process's memory across a suspend and resume.
      const counter = (await vm.agent.exec({ command: COUNTER })).stdout.trim();
      const before = await readCounter(vm, counter);
      await engine.suspend(vm.id);
      await engine.resume(vm.id);
      expect(await readCounter(vm, counter)).toBeGreaterThanOrEqual(before);
      await engine.terminate(vm.id);
      // Taken, it was replaced.
      expect(isAlive(await prestartedPid(engine))).toBe(true);
    } finally {
      await engine.close();
    }
    // Shutdown ends what was pre-started: nothing is left running or on disk.
    expect(await readdir(join(dataDir, "vms"))).toEqual([]);
    expect(qemuProcessesOf(dataDir)).toEqual([]);
  });

  it("discard a fork child whose process started during its parent's capture when the server is killed before the capture ends", async () => {
    const dataDir = join(ctx.dataDir, "..", `${ctx.dataDir.split("/").pop()}-fork`);
    const config = engineConfig(dataDir);
    // A server killed with SIGKILL while a fork's capture runs (held here: it never ends) and its child's QEMU waits.
    const script = `
      import { Engine } from "./src/vmm/engine.ts";
      import { Machine } from "./src/vmm/machine.ts";
      const engine = await Engine.open(JSON.parse(process.env.CONFIG));
      const parent = await engine.launch(await engine.loadSnapshot(process.env.SNAPSHOT));
      Machine.prototype.saveRunning = () => new Promise(() => {});
      void engine.fork(parent.id, ["child"]);
      for (;;) {
        const pid = engine.list().find((v) => v.id === "child")?.machine?.pid;
        if (pid) { console.log(JSON.stringify({ parent: parent.id, child: pid })); break; }
        await new Promise((r) => setTimeout(r, 20));
      }
      setInterval(() => {}, 1000);
    `;
    const killed = await serverKilledAfter<{ parent: string; child: number }>(script, config);
    expect(isAlive(killed.child)).toBe(true);
    // Left behind: the capture's directory, and (where QEMU writes mapped-ram) its state in the parent's socket directory.
    expect((await readdir(join(dataDir, "vms"))).filter((f) => f.startsWith(".fork-"))).toHaveLength(1);
    const parentSockets = socketPaths(killed.parent).dir;
    const captureStates = async () => (await readdir(parentSockets)).filter((f) => f.startsWith("capture-"));
    expect(await captureStates()).toHaveLength(qemuFeatures().fileMigration ? 1 : 0);

    const engine = await Engine.open(config);
    try {
      // The child was recorded starting: adoption ends its process and removes it; the capture's directory
      // (no record) goes too, and nothing of the capture is left in the parent's socket directory.
      expect(isAlive(killed.child)).toBe(false);
      expect(await readdir(join(dataDir, "vms"))).toEqual([killed.parent]);
      const parent = engine.get(killed.parent);
      expect(parent.status).toBe("running");
      expect(await captureStates()).toEqual([]);
      // The parent forks again.
      const { children } = await engine.fork(parent.id, ["child-2"]);
      expect(children.map((c) => (c instanceof Error ? c.message : c.status))).toEqual(["running"]);
    } finally {
      for (const vm of engine.list()) await engine.terminate(vm.id);
      await engine.close();
    }
    expect(qemuProcessesOf(dataDir)).toEqual([]);
  });
});
