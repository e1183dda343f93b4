/**
 * Launch and resume latency (`npm run bench`), the way the ComputeSDK
 * benchmark measures sandbox platforms: create → first command answer through
 * the HTTP API, back to back, staggered 1.5 s apart, and a burst of 8 at once,
 * with the server's default warm pool. Then, at the engine, a direct restore
 * (no warm VM; in a pre-started process unless COCOON_PRESTARTED=0) → first
 * exec and a resume → first exec, each broken down into the engine's phases
 * (`Engine` emits `phases`). Writes bench/results/launch.{json,md}.
 */
import { cpus, loadavg, totalmem } from "node:os";
import { resolveServerConfig } from "../src/server/config.ts";
import { newVmId } from "../src/vmm/engine.ts";
import type { TimedOperation } from "../src/vmm/phases.ts";
import { qemuBuild } from "../src/vmm/snapshot.ts";
import { startApiStack } from "./api-stack.ts";
import { GUEST_FORK_EXEC_US_COMMAND, summarize, summaryTable, timed, writeResults, type Summary } from "./stats.ts";

const root = process.env.COCOON_BENCH_DIR ?? "/tmp/cocoon-bench";
const count = (name: string, dflt: number) => Number(process.env[name] ?? dflt);
const SEQUENTIAL = count("BENCH_SEQUENTIAL", 12);
const STAGGERED = count("BENCH_STAGGERED", 8);
const STAGGER_MS = 1500;
const BURST = count("BENCH_BURST", 8);
const DIRECT = count("BENCH_DIRECT", 10);
const RESUMES = count("BENCH_RESUMES", 10);
const EXECS = count("BENCH_EXECS", 40);
const log = (line: string) => console.error(`[bench] ${line}`);

async function main(): Promise<void> {
  const { warmPoolSize, prestartedProcesses } = resolveServerConfig({});
  const { runtime, api, close } = await startApiStack({ root, dataDirName: "launch-data", warmPoolSize, prestartedProcesses, log });
  const engine = runtime.engine;
  const phases: Record<TimedOperation, Record<string, number>[]> = { launch: [], resume: [], warm: [], prestart: [], capture: [], "fork-child": [], fork: [] };
  engine.on("phases", (op: TimedOperation, p: Record<string, number>) => phases[op].push(p));
  const load = [loadavg()[0]!];

  /** POST /v1/microvms, then the first exec's answer: the ComputeSDK figure (ms); the VM is deleted afterwards, untimed. */
  const createToFirstCommand = async (): Promise<number> => {
    const t = performance.now();
    const vm = await api("POST", "/v1/microvms", { image: "base" });
    const answer = await api("POST", `/v1/microvms/${vm.microVmId}/exec`, { command: ["echo", "ready"] });
    const ms = performance.now() - t;
    if (answer.stdout?.trim() !== "ready") throw new Error(`unexpected exec answer ${JSON.stringify(answer)}`);
    void api("DELETE", `/v1/microvms/${vm.microVmId}`).catch((err: Error) => log(`delete: ${err.message}`));
    return ms;
  };
  const settle = async () => {
    // Deletes finish and the pool is full again before the next method starts.
    while (engine.list().length > 0) await new Promise((r) => setTimeout(r, 100));
    await engine.prewarm(runtime.baseImage);
    load.push(loadavg()[0]!);
  };

  try {
    await settle();
    log(`create → first command, back to back ×${SEQUENTIAL}`);
    const sequential: number[] = [];
    for (let i = 0; i < SEQUENTIAL; i++) sequential.push(await createToFirstCommand());
    await settle();

    log(`create → first command, staggered ${STAGGER_MS} ms ×${STAGGERED}`);
    const staggered = await Promise.all(
      Array.from({ length: STAGGERED }, (_, i) => new Promise((r) => setTimeout(r, i * STAGGER_MS)).then(createToFirstCommand)),
    );
    await settle();

    log(`create → first command, burst of ${BURST}`);
    const burst = await Promise.all(Array.from({ length: BURST }, createToFirstCommand));
    await settle();

    // A port forwarded beyond the snapshot's skips the pool: every launch restores in a new QEMU process.
    log(`direct restore → first exec ×${DIRECT}`);
    phases.launch.length = 0;
    const direct: number[] = [];
    const directExec: number[] = [];
    for (let i = 0; i < DIRECT; i++) {
      const t = performance.now();
      const vm = await engine.launch(runtime.baseImage, { id: newVmId(), guestPorts: [8080] });
      const launched = performance.now();
      await vm.agent.exec({ command: ["true"] });
      direct.push(performance.now() - t);
      directExec.push(performance.now() - launched);
      await engine.terminate(vm.id);
    }
    const directPhases = phaseSummaries(phases.launch);

    log(`resume → first exec ×${RESUMES}`);
    const vm = await engine.launch(runtime.baseImage);
    await vm.agent.exec({ command: ["true"] });
    const resume: number[] = [];
    const resumeExec: number[] = [];
    for (let i = 0; i < RESUMES; i++) {
      await engine.suspend(vm.id);
      const t = performance.now();
      await engine.resume(vm.id);
      const resumed = performance.now();
      await vm.agent.exec({ command: ["true"] });
      resume.push(performance.now() - t);
      resumeExec.push(performance.now() - resumed);
    }
    log(`exec round trip ×${EXECS}`);
    for (let i = 0; i < 10; i++) await vm.agent.exec({ command: ["true"] }); // past the first translations
    const exec: number[] = [];
    for (let i = 0; i < EXECS; i++) exec.push((await timed(() => vm.agent.exec({ command: ["true"] })))[1]);
    const guestForkExecMs = Number((await vm.agent.exec({ command: GUEST_FORK_EXEC_US_COMMAND })).stdout.trim()) / 1000;
    await engine.terminate(vm.id);
    const resumePhases = phaseSummaries(phases.resume);
    const warmPhases = phaseSummaries(phases.warm);
    const prestartPhases = phaseSummaries(phases.prestart);
    load.push(loadavg()[0]!);

    const figures = {
      sequentialMs: summarize(sequential),
      staggeredMs: summarize(staggered),
      burstMs: summarize(burst),
      directRestoreToFirstExecMs: summarize(direct),
      resumeToFirstExecMs: summarize(resume),
      execRoundTripMs: summarize(exec),
      guestForkExecMs,
      phasesMs: { directLaunch: { ...directPhases, "first exec": summarize(directExec) }, resume: { ...resumePhases, "first exec": summarize(resumeExec) }, warmPool: warmPhases, prestart: prestartPhases },
    };
    const results = {
      at: new Date().toISOString(),
      host: { cpus: cpus().length, cpuModel: cpus()[0]?.model, memoryGiB: Math.round(totalmem() / 2 ** 30), accelerator: engine.accelerator, qemu: qemuBuild() },
      loadAverage1m: load.map((l) => Math.round(l * 100) / 100),
      warmPoolSize,
      prestartedProcesses,
      ...figures,
    };
    const phaseRows = (name: string, byPhase: Record<string, Summary>) => Object.entries(byPhase).map(([p, s]): [string, Summary] => [`${name}: ${p}`, s]);
    const md = [
      `# Launch and resume benchmark (${results.at})`,
      "",
      `Host: ${cpus().length} × ${cpus()[0]?.model}, accelerator **${engine.accelerator}**, ${results.host.qemu}; load average (1 min) during the run ${results.loadAverage1m.join(", ")}. Image: base, ${runtime.baseImage.manifest.vcpus} vCPU, ${runtime.baseImage.manifest.memoryMiB} MiB; warm pool ${warmPoolSize} (COCOON_WARM_POOL), pre-started processes ${prestartedProcesses} (COCOON_PRESTARTED).`,
      "",
      "ComputeSDK method: `POST /v1/microvms` → the first `POST …/exec` answer.",
      "",
      ...summaryTable("ms", [
        ["create → first command, back to back", figures.sequentialMs],
        [`create → first command, staggered ${STAGGER_MS} ms`, figures.staggeredMs],
        [`create → first command, burst of ${BURST}`, figures.burstMs],
        ["direct restore (no pool) → first exec", figures.directRestoreToFirstExecMs],
        ["resume → first exec", figures.resumeToFirstExecMs],
        ["exec round trip (`true`, engine → agent)", figures.execRoundTripMs],
      ]),
      "",
      `- fork+exec of /bin/true inside the guest: ${guestForkExecMs} ms, so the exec path adds **${Math.round((figures.execRoundTripMs.p50 - guestForkExecMs) * 10) / 10} ms** (p50)`,
      "",
      "Where the time goes (each phase's own p50/p95; the engine's `phases`):",
      "",
      ...summaryTable("ms", [
        ...phaseRows("direct launch", figures.phasesMs.directLaunch),
        ...phaseRows("resume", figures.phasesMs.resume),
        ...phaseRows("warm pool refill", figures.phasesMs.warmPool),
        ...phaseRows("pre-start (in the background)", figures.phasesMs.prestart),
      ]),
      "",
    ].join("\n");
    await writeResults("launch", results, md);
    console.log(md);
  } finally {
    await close();
  }
  process.exit(0);
}

/** Per phase, the summary of its durations over the runs that had it. */
function phaseSummaries(runs: Record<string, number>[]): Record<string, Summary> {
  const byPhase: Record<string, number[]> = {};
  for (const run of runs) for (const [phase, ms] of Object.entries(run)) (byPhase[phase] ??= []).push(ms);
  return Object.fromEntries(Object.entries(byPhase).map(([phase, ms]) => [phase, summarize(ms)]));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
