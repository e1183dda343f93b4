import { monitorEventLoopDelay } from "node:perf_hooks";
import { describe, expect, it } from "vitest";
import { AgentError } from "../../src/vmm/agent-client.ts";
import type { MicroVm } from "../../src/vmm/engine.ts";
import { isAlive, sleep } from "../../src/util/process.ts";
import { useEngine } from "../support/engine-fixture.ts";

/*
 * A guest that abuses its resources (a fork bomb, a full disk, a memory hog)
 * leaves the host, the server and other VMs responsive, its own agent keeps
 * answering, and the VM can still be terminated. Each test abuses a victim
 * beside a bystander launched from the same snapshot.
 */
const ctx = await useEngine();

/**
 * How long anything that should stay responsive may take to answer. Generous
 * on purpose: these tests check that things answer at all while a guest is
 * abused, not how fast (two cores under TCG, and the abuse shares them).
 */
const ANSWER_MS = 10_000;
/**
 * The abused VM's own agent shares its vCPU with the abuse (and its QEMU is
 * held to its CPU quota): it must keep answering, but may be slower; a CI
 * run once saw one /health take over 10 s mid fork bomb.
 */
const VICTIM_ANSWER_MS = 30_000;

/** The cgroup cocoon-agent runs every exec, terminal and app in (agent/internal/initsys). */
const WORKLOAD = "/sys/fs/cgroup/cocoon-workload";

/** A victim to abuse and a bystander from the same snapshot, beside it. */
async function launchPair(): Promise<{ victim: MicroVm; bystander: MicroVm }> {
  const [victim, bystander] = await Promise.all([ctx.engine.launch(ctx.snapshot), ctx.engine.launch(ctx.snapshot)]);
  return { victim: victim!, bystander: bystander! };
}

/** `call` settles within `ms`; a timeout or failure names what did not answer. */
async function inTime<T>(what: string, call: (signal: AbortSignal) => Promise<T>, ms = ANSWER_MS): Promise<T> {
  const started = Date.now();
  try {
    return await call(AbortSignal.timeout(ms));
  } catch (err) {
    throw new Error(`${what}: ${(err as Error).message} after ${Date.now() - started} ms`, { cause: err });
  }
}

/** The agent's /health answers in time (it needs no process in the guest). */
async function healthy(vm: MicroVm, ms = ANSWER_MS): Promise<void> {
  const health = await inTime(`${vm.id} GET /health`, (signal) => vm.agent.json<{ status: string }>("GET", "/health", { signal }), ms);
  expect(health.status).toBe("ok");
}

/** A command runs to completion in time. */
async function runs(vm: MicroVm, command: string): Promise<string> {
  const res = await inTime(`${vm.id} exec ${command.slice(0, 40)}`, (signal) => vm.agent.exec({ command }, signal));
  expect(res, res.stderr).toMatchObject({ exitCode: 0 });
  return res.stdout;
}

/**
 * Checks, while `load` runs in the victim, every couple of seconds: the
 * victim's agent answers /health, the bystander runs a command, and this
 * process (the server) keeps its event loop turning.
 */
async function responsiveWhile(load: Promise<unknown>, victim: MicroVm, bystander: MicroVm): Promise<number> {
  const loop = monitorEventLoopDelay({ resolution: 20 });
  loop.enable();
  let done = false;
  void load.finally(() => (done = true)).catch(() => undefined);
  let rounds = 0;
  try {
    while (!done) {
      await Promise.all([healthy(victim, VICTIM_ANSWER_MS), runs(bystander, "true")]);
      rounds++;
      await Promise.race([load, sleep(2000)]).catch(() => undefined);
    }
  } finally {
    loop.disable();
  }
  expect(loop.max / 1e6).toBeLessThan(ANSWER_MS);
  return rounds;
}

/** Ends the VM: terminate resolves and its QEMU process is gone. */
async function terminates(vm: MicroVm): Promise<void> {
  const pid = vm.record.pid!;
  expect(isAlive(pid)).toBe(true);
  await ctx.engine.terminate(vm.id);
  expect(isAlive(pid)).toBe(false);
  expect(() => ctx.engine.get(vm.id)).toThrow("not found");
}

describe("a guest abusing its limits", () => {
  it("fork bomb: the agent answers throughout, ends it at the exec's timeout, and the VM terminates", async () => {
    const { victim, bystander } = await launchPair();
    // Each b starts two more in the background and returns; the leader stays
    // until the exec's timeout kills its process group.
    const bomb = victim.agent.exec({ command: "b() { b | b & }; b; exec sleep 600", timeoutMs: 25_000 });
    expect(await responsiveWhile(bomb, victim, bystander)).toBeGreaterThanOrEqual(1);
    expect(await bomb).toMatchObject({ timedOut: true, signal: "SIGKILL" });

    // The killed group takes a while to die and be reaped (thousands of exits
    // under TCG, which also slow the workload's new processes): the agent
    // answers meanwhile, and the guest then works as before.
    const deadline = Date.now() + 60_000;
    for (;;) {
      await healthy(victim, VICTIM_ANSWER_MS);
      const left = await runs(victim, `cat ${WORKLOAD}/pids.current`).then(Number, () => Infinity);
      if (left <= 5) break;
      expect(Date.now(), `${left} processes left in the workload`).toBeLessThan(deadline);
      await sleep(500);
    }
    // It did explode: hundreds of processes at least (each costs the
    // workload over 100 KiB of kernel memory).
    expect(Number(await runs(victim, `cat ${WORKLOAD}/memory.peak`))).toBeGreaterThan(100 * 2 ** 20);
    expect(await runs(victim, "echo fine")).toBe("fine\n");
    await healthy(bystander);
    await terminates(victim);
  });

  it("full disk: writes fail with a clear error, not a hang; exec still runs, and the VM terminates", async () => {
    const { victim, bystander } = await launchPair();
    // fallocate reserves blocks without writing them (TCG writes slowly):
    // nearly all free space in one file, the rest in small ones and a last
    // partial write, until even root's reserved blocks are gone (ext4 keeps
    // a few thousand blocks back from everyone).
    await runs(
      victim,
      `free=$(( $(stat -f -c '%f * %S' /) )); fallocate -l $((free - 64 * 1024 * 1024)) /fill
       i=0; while fallocate -l 1M /fill.$i 2>/dev/null; do i=$((i + 1)); done
       dd if=/dev/zero of=/fill.tail bs=4k 2>/dev/null; sync; true`,
    );
    expect(await runs(victim, "df --output=avail,pcent / | tail -1")).toMatch(/^\s*0\s+100%\s*$/);

    for (const write of [
      () => victim.agent.writeFile("/root/more.bin", Buffer.alloc(1 << 20, 1)),
      () => victim.agent.writeFile("/root/note", Buffer.from("hi")),
      () => victim.agent.mkdir("/root/newdir"),
    ]) {
      const err = await Promise.race([write().then(() => "written", (e: unknown) => e), sleep(ANSWER_MS).then(() => "hung")]);
      expect(err).toBeInstanceOf(AgentError);
      expect((err as AgentError).status).toBe(409);
      expect((err as Error).message).toContain("no space left on device");
    }
    // Nothing half-written is left behind.
    expect(await runs(victim, "ls -a /root | grep -c cocoon || true")).toBe("0\n");
    expect(await runs(victim, "echo still runs")).toBe("still runs\n");
    await healthy(bystander);
    expect(await runs(bystander, "df --output=pcent / | tail -1")).not.toMatch(/100%/);

    // Freeing space makes writes work again.
    await runs(victim, "rm -f /fill /fill.*");
    await victim.agent.writeFile("/root/note", Buffer.from("hi"));
    await terminates(victim);
  });

  it("memory hog: the OOM killer ends the hog, not the agent, and the VM terminates", async () => {
    const { victim, bystander } = await launchPair();
    // tail keeps the last ten lines, and /dev/zero has no line break: it
    // grows until killed.
    const hog = victim.agent.exec({ command: "tail /dev/zero; echo exit=$?", timeoutMs: 90_000 });
    await responsiveWhile(hog, victim, bystander);
    const res = await hog;
    expect(res).toMatchObject({ timedOut: false, exitCode: 0 });
    expect(res.stdout).toBe("exit=137\n");

    // The kill was the workload's OOM killer's, charged to the workload's cgroup.
    expect(await runs(victim, `grep oom_kill ${WORKLOAD}/memory.events`)).toMatch(/^oom_kill [1-9]/m);
    expect(await runs(victim, "dmesg | grep -o 'Killed process [0-9]* (tail)'")).toMatch(/Killed process \d+ \(tail\)/);
    await healthy(victim);
    expect(await runs(victim, "echo fine")).toBe("fine\n");
    await terminates(victim);
  });
});
