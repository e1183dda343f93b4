/**
 * Engine benchmark (`npm run bench`): cold boot vs launch from snapshot,
 * exec round trip, suspend/resume, memory per idle clone, clone capacity.
 * Prints a table and writes bench/results/engine.{json,md}.
 */
import { readFileSync, statSync } from "node:fs";
import { mkdir, rm } from "node:fs/promises";
import { cpus, freemem, totalmem } from "node:os";
import { join } from "node:path";
import { startRuntime } from "../src/server/runtime.ts";
import { newVmId, type MicroVm } from "../src/vmm/engine.ts";
import { GUEST_FORK_EXEC_US_COMMAND, summarize, summaryTable, timed, writeResults } from "./stats.ts";

const root = process.env.COCOON_BENCH_DIR ?? "/tmp/cocoon-bench";
const count = (name: string, dflt: number) => Number(process.env[name] ?? dflt);
const COLD_BOOTS = count("BENCH_COLD_BOOTS", 8);
const LAUNCHES = count("BENCH_LAUNCHES", 24);
const EXECS = count("BENCH_EXECS", 100);
const SUSPENDS = count("BENCH_SUSPENDS", 10);
const PSS_CLONES = count("BENCH_PSS_CLONES", 20);
const MAX_CLONES = count("BENCH_MAX_CLONES", 120);

const log = (line: string) => console.error(`[bench] ${line}`);

/** Proportional set size of a process in MiB (shared pages split among their users). */
function pssMiB(pid: number): number {
  const kb = /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"))?.[1];
  return Number(kb) / 1024;
}

async function main(): Promise<void> {
  const dataDir = join(root, "data");
  await rm(dataDir, { recursive: true, force: true });
  await mkdir(dataDir, { recursive: true });
  const { engine, baseImage, rootfs } = await startRuntime({ dataDir, assetsDir: join(root, "assets"), warmPoolSize: 1, log });
  const results: Record<string, unknown> = {
    host: { cpus: cpus().length, cpuModel: cpus()[0]?.model, memoryGiB: Math.round(totalmem() / 2 ** 30), accelerator: engine.accelerator },
    image: { vcpus: baseImage.manifest.vcpus, memoryMiB: baseImage.manifest.memoryMiB },
    at: new Date().toISOString(),
  };

  try {
    log(`cold boot to agent-ready ×${COLD_BOOTS}`);
    const cold: number[] = [];
    for (let i = 0; i < COLD_BOOTS; i++) {
      const dir = join(dataDir, `cold-${i}`);
      const [template, ms] = await timed(() =>
        engine.bootTemplate({ dir, backingDisk: rootfs, vcpus: 1, memoryMiB: baseImage.manifest.memoryMiB }),
      );
      cold.push(ms);
      await engine.discardTemplate(template);
      await rm(dir, { recursive: true, force: true });
    }

    // Direct: a new QEMU process restores the snapshot (a caller-chosen id skips the pool).
    log(`launch from snapshot to first exec answer, direct ×${LAUNCHES}`);
    const launch: number[] = [];
    const launchOnly: number[] = [];
    for (let i = 0; i < LAUNCHES; i++) {
      const t = performance.now();
      const vm = await engine.launch(baseImage, { id: newVmId() });
      launchOnly.push(performance.now() - t);
      await vm.agent.exec({ command: ["true"] });
      launch.push(performance.now() - t);
      await engine.terminate(vm.id);
    }
    // Warm pool: the restore happened in the background; launch re-keys a warmed VM.
    log(`launch from snapshot to first exec answer, warm pool ×${LAUNCHES}`);
    const pooled: number[] = [];
    for (let i = 0; i < LAUNCHES; i++) {
      await engine.prewarm(baseImage);
      const t = performance.now();
      const vm = await engine.launch(baseImage);
      await vm.agent.exec({ command: ["true"] });
      pooled.push(performance.now() - t);
      await engine.terminate(vm.id);
    }
    await engine.prewarm(baseImage);

    log(`exec round trip ×${EXECS}`);
    const vm = await engine.launch(baseImage);
    for (let i = 0; i < 10; i++) await vm.agent.exec({ command: ["true"] }); // warm the guest's code paths
    const exec: number[] = [];
    const health: number[] = [];
    for (let i = 0; i < EXECS; i++) exec.push((await timed(() => vm.agent.exec({ command: ["true"] })))[1]);
    for (let i = 0; i < EXECS; i++) health.push((await timed(() => vm.agent.json("GET", "/health")))[1]);
    const inGuest = await vm.agent.exec({ command: GUEST_FORK_EXEC_US_COMMAND });

    log(`suspend/resume of a ${baseImage.manifest.memoryMiB} MiB VM ×${SUSPENDS}`);
    const suspend: number[] = [];
    const resume: number[] = [];
    const stateMiB: number[] = [];
    for (let i = 0; i < SUSPENDS; i++) {
      suspend.push((await timed(() => engine.suspend(vm.id)))[1]);
      stateMiB.push(statMiB(join(vm.dir, "suspended.state")));
      resume.push((await timed(() => engine.resume(vm.id)))[1]);
      await vm.agent.exec({ command: ["true"] });
    }
    await engine.terminate(vm.id);

    log(`memory of ${PSS_CLONES} idle clones`);
    const clones: MicroVm[] = [];
    for (let i = 0; i < PSS_CLONES; i++) clones.push(await engine.launch(baseImage));
    await new Promise((r) => setTimeout(r, 3000)); // let them settle into idle
    const pss = clones.map((c) => pssMiB(c.machine!.pid));
    const pssTotal = pss.reduce((a, b) => a + b, 0);

    log(`max clones running at once (cap ${MAX_CLONES})`);
    let stopReason = `reached the cap of ${MAX_CLONES}`;
    let lastExecMs = 0;
    const capacityDeadline = Date.now() + 240_000;
    while (clones.length < MAX_CLONES) {
      if (Date.now() > capacityDeadline) {
        stopReason = "time budget of 4 min for this measurement ran out";
        break;
      }
      if (freemem() < totalmem() * 0.1) {
        stopReason = "host free memory below 10 %";
        break;
      }
      try {
        const c = await engine.launch(baseImage);
        clones.push(c);
        lastExecMs = (await timed(() => c.agent.exec({ command: ["true"] })))[1];
        if (lastExecMs > 2000) {
          stopReason = `exec on the newest clone took ${Math.round(lastExecMs)} ms (> 2 s): host saturated`;
          break;
        }
      } catch (err) {
        stopReason = `launch failed: ${(err as Error).message}`;
        break;
      }
    }
    const maxClones = clones.length;
    for (const c of clones) await engine.terminate(c.id);

    const figures = {
      coldBootToAgentReadyMs: summarize(cold),
      launchToFirstExecMs: summarize(launch),
      warmPoolLaunchToFirstExecMs: summarize(pooled),
      launchOnlyMs: summarize(launchOnly),
      execRoundTripMs: summarize(exec),
      agentHealthRoundTripMs: summarize(health),
      guestForkExecTrueMs: Number(inGuest.stdout.trim()) / 1000,
      suspendMs: summarize(suspend),
      resumeMs: summarize(resume),
      suspendedStateMiB: summarize(stateMiB),
      idleClonePssMiB: { clones: PSS_CLONES, totalMiB: Math.round(pssTotal), perCloneMiB: Math.round((pssTotal / PSS_CLONES) * 10) / 10 },
      maxClones: { count: maxClones, stopReason, lastExecMs: Math.round(lastExecMs) },
      coldVsSnapshotRatio: Math.round((summarize(cold).p50 / summarize(launch).p50) * 10) / 10,
      coldVsWarmPoolRatio: Math.round((summarize(cold).p50 / summarize(pooled).p50) * 10) / 10,
    };
    Object.assign(results, figures);
    const md = [
      `# Engine benchmark (${results.at})`,
      "",
      `Host: ${cpus().length} × ${cpus()[0]?.model}, ${Math.round(totalmem() / 2 ** 30)} GiB, accelerator **${engine.accelerator}**. Image: base (Debian bookworm), ${baseImage.manifest.vcpus} vCPU, ${baseImage.manifest.memoryMiB} MiB.`,
      "",
      ...summaryTable("ms", [
      ["cold boot → agent ready (baseline)", figures.coldBootToAgentReadyMs],
      ["launch from snapshot → first exec answer (direct restore)", figures.launchToFirstExecMs],
      ["launch from snapshot → first exec answer (warm pool)", figures.warmPoolLaunchToFirstExecMs],
      ["launch from snapshot, direct (launch returns)", figures.launchOnlyMs],
      ["exec round trip (`true`)", figures.execRoundTripMs],
      ["agent round trip (GET /health)", figures.agentHealthRoundTripMs],
      ["suspend (512 MiB VM)", figures.suspendMs],
      ["resume (512 MiB VM)", figures.resumeMs],
      ]),
      "",
      `- Cold boot / snapshot launch to first exec (p50): **${figures.coldVsSnapshotRatio}×** direct, **${figures.coldVsWarmPoolRatio}×** with the warm pool`,
      `- fork+exec of /bin/true measured inside the guest: ${figures.guestForkExecTrueMs} ms`,
      `- Suspended state on disk: p50 ${figures.suspendedStateMiB.p50} MiB`,
      `- Idle clones: ${PSS_CLONES} clones, ${figures.idleClonePssMiB.totalMiB} MiB PSS in all, **${figures.idleClonePssMiB.perCloneMiB} MiB per clone**`,
      `- Max clones at once: **${maxClones}** (${stopReason})`,
      "",
    ].join("\n");
    await writeResults("engine", results, md);
    console.log(md);
  } finally {
    // Whatever happened, leave no VM behind.
    for (const vm of engine.list()) await engine.terminate(vm.id).catch(() => undefined);
    await engine.close();
  }
  process.exit(0);
}
function statMiB(path: string): number {
  return Math.round(statSync(path).size / 2 ** 20);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
