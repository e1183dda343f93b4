/**
 * Named snapshots and forks of a running VM (issue #17): how long a snapshot
 * or fork pauses the source VM (a fresh guest, and one with 400 MiB of its
 * 512 MiB filled), and POST /fork → 201 with 1 and with 10 children RUNNING.
 * Writes bench/results/fork.{json,md}.
 */
import { readFile } from "node:fs/promises";
import type { TimedOperation } from "../src/vmm/phases.ts";
import { startApiStack } from "./api-stack.ts";
import { summarize, summaryTable, timed, writeResults } from "./stats.ts";

const root = process.env.COCOON_BENCH_DIR ?? "/tmp/cocoon-bench";
const SNAPSHOTS = Number(process.env.BENCH_SNAPSHOTS ?? 5);
const FORKS = Number(process.env.BENCH_FORKS ?? 5);
const WIDE_FORKS = Number(process.env.BENCH_WIDE_FORKS ?? 2);
const log = (line: string) => console.error(`[bench] ${line}`);

async function main(): Promise<void> {
  // Room for a parent and ten children whatever the host's cores (admission is not what is measured).
  const { runtime, api, close } = await startApiStack({
    root,
    dataDirName: "fork-data",
    warmPoolSize: 0,
    log,
    tenantImages: true,
    capacity: { vcpus: 64, memoryMiB: 16 * 1024 },
  });
  // The engine's phases of each fork (capture.ts, Engine.fork): where a fork's time goes.
  let phases: { op: TimedOperation; p: Record<string, number> }[] = [];
  runtime.engine.on("phases", (op: TimedOperation, p: Record<string, number>) => phases.push({ op, p }));
  /** One row per fork call: the API's wall time and the engine's phases; the lifecycle's own work is the rest. */
  const breakdown: Record<string, Record<string, number>[]> = { fork1: [], fork10: [] };
  /** A process's CPU time so far (user + system, all its threads), ms; 0 once it is gone. */
  const processCpuMs = async (pid: number | undefined) => {
    const stat = pid ? await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "") : "";
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th, in clock ticks (100 a second).
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11] ?? 0) + Number(fields[12] ?? 0)) * 10;
  };
  /**
   * CPU spent on one fork call: the server's (this process: API, lifecycle,
   * engine) and each child's QEMU up to the 201 (its jail's shell and tools
   * exec'd into it, its restore and the guest's re-key).
   */
  const cpu: Record<string, Record<string, number>[]> = { fork1: [], fork10: [] };
  const forkCpu = async (into: string, call: () => Promise<any>) => {
    const before = process.cpuUsage();
    const [res, ms] = await timed(call);
    const server = process.cpuUsage(before);
    const children = await Promise.all((res.microVms as { microVmId: string }[]).map((c) => processCpuMs(runtime.engine.get(c.microVmId).record.pid)));
    cpu[into]!.push({ server: (server.user + server.system) / 1000, "child QEMU (mean)": children.reduce((a, b) => a + b, 0) / children.length, "children QEMU (sum)": children.reduce((a, b) => a + b, 0) });
    return [res, ms] as const;
  };
  const record = (into: string, apiMs: number) => {
    const fork = phases.find((x) => x.op === "fork")!.p;
    const capture = phases.find((x) => x.op === "capture")!.p;
    const children = phases.filter((x) => x.op === "fork-child").map((x) => x.p);
    const engineMs = Object.values(fork).reduce((a, b) => a + b, 0);
    const row: Record<string, number> = { api: apiMs, lifecycle: apiMs - engineMs };
    for (const [k, v] of Object.entries(fork)) row[`engine.${k}`] = v;
    for (const [k, v] of Object.entries(capture)) row[`capture.${k}`] = v;
    // A child's phases: the slowest child's (it decides when the call answers), and each phase's mean over the children.
    const slowest = children.reduce((a, b) => (Object.values(b).reduce((x, y) => x + y, 0) > Object.values(a).reduce((x, y) => x + y, 0) ? b : a));
    for (const [k, v] of Object.entries(slowest)) row[`slowest child.${k}`] = v;
    for (const k of Object.keys(slowest)) row[`mean child.${k}`] = children.reduce((a, c) => a + (c[k] ?? 0), 0) / children.length;
    breakdown[into]!.push(row);
    phases = [];
  };
  /** The pauses the VM's events report, in order. */
  const pauses = async (id: string): Promise<number[]> =>
    ((await api("GET", `/v1/microvms/${id}/events`)).events as { message: string }[]).flatMap((e) => {
      const m = /paused (\d+) ms/.exec(e.message);
      return m ? [Number(m[1])] : [];
    });
  try {
    const vm = await api("POST", "/v1/microvms", { image: "base", idlePolicy: { suspendAfterSeconds: 0 } });
    const id = vm.microVmId as string;
    await api("POST", `/v1/microvms/${id}/exec`, { command: "echo x > /root/f; sync" });

    log(`snapshot of a fresh VM ×${SNAPSHOTS}`);
    const snapshotCall: number[] = [];
    for (let i = 0; i < SNAPSHOTS; i++) snapshotCall.push((await timed(() => api("POST", `/v1/microvms/${id}/snapshots`, { name: "bench" })))[1]);
    const freshPause = await pauses(id);

    log(`fork ×1, ${FORKS} times`);
    const fork1: number[] = [];
    for (let i = 0; i < FORKS; i++) {
      phases = [];
      const [res, ms] = await forkCpu("fork1", () => api("POST", `/v1/microvms/${id}/fork`, { count: 1 }));
      fork1.push(ms);
      record("fork1", ms);
      for (const c of res.microVms) await api("DELETE", `/v1/microvms/${c.microVmId}`);
    }
    log(`fork ×10, ${WIDE_FORKS} times`);
    const fork10: number[] = [];
    for (let i = 0; i < WIDE_FORKS; i++) {
      phases = [];
      const [res, ms] = await forkCpu("fork10", () => api("POST", `/v1/microvms/${id}/fork`, { count: 10 }));
      fork10.push(ms);
      record("fork10", ms);
      const row = breakdown.fork10!.at(-1)!;
      log(`fork ×10 call ${i + 1}: ${Math.round(ms)} ms; slowest child: spawn ${row["slowest child.spawn"]}, restore ${row["slowest child.restore"]}, re-key ${row["slowest child.re-key"]} ms; children's CPU ${cpu.fork10!.at(-1)!["children QEMU (sum)"]} ms`);
      for (const c of res.microVms) await api("DELETE", `/v1/microvms/${c.microVmId}`);
    }
    const forkPause = (await pauses(id)).slice(freshPause.length);

    log("snapshot with 400 MiB of the guest's 512 MiB filled");
    await api("POST", `/v1/microvms/${id}/exec`, { command: "head -c 400M /dev/urandom > /dev/shm/fill", timeoutSeconds: 600 });
    for (let i = 0; i < 3; i++) await api("POST", `/v1/microvms/${id}/snapshots`, { name: "bench-full" });
    const fullPause = (await pauses(id)).slice(freshPause.length + forkPause.length);
    await api("DELETE", `/v1/microvms/${id}`);

    const figures = {
      snapshotPauseFreshMs: summarize(freshPause),
      snapshotPauseFilledMs: summarize(fullPause),
      forkPauseMs: summarize(forkPause),
      snapshotCallMs: summarize(snapshotCall),
      fork1Ms: summarize(fork1),
      fork10Ms: summarize(fork10),
      breakdown: Object.fromEntries(Object.entries(breakdown).map(([k, rows]) => [k, phaseSummary(rows)])),
      cpuMs: Object.fromEntries(Object.entries(cpu).map(([k, rows]) => [k, phaseSummary(rows)])),
      /** Every call's own figures, in order: a p50 of five hides how they spread. */
      calls: { breakdown, cpu },
    };
    const md = [
      `# Snapshot and fork benchmark (${new Date().toISOString()})`,
      "",
      `Accelerator **${runtime.engine.accelerator}**, base image (1 vCPU, 512 MiB), no warm pool. A pause is how long the source VM's vCPUs were stopped.`,
      "",
      ...summaryTable("ms", [
        ["snapshot pause, fresh guest", figures.snapshotPauseFreshMs],
        ["snapshot pause, 400 MiB of RAM filled", figures.snapshotPauseFilledMs],
        ["fork pause", figures.forkPauseMs],
        ["POST /snapshots → 201 READY", figures.snapshotCallMs],
        ["POST /fork {count: 1} → 201, child RUNNING", figures.fork1Ms],
        ["POST /fork {count: 10} → 201, children RUNNING", figures.fork10Ms],
      ]),
      "",
      "Where a fork's time goes (p50 of each phase over the calls, ms): `engine.*` the engine's fork, `capture.*` the parent's capture",
      "(its pause is stop … cont), `slowest child.*` the phases of the child that finished last, `mean child.*` each phase's mean over",
      "the children, `lifecycle` the API's work around the engine (admission, records, events).",
      "",
      "| phase | fork ×1 | fork ×10 |",
      "|---|---|---|",
      ...Object.keys(figures.breakdown.fork1 ?? {}).map((k) => `| ${k} | ${figures.breakdown.fork1![k]} | ${figures.breakdown.fork10?.[k] ?? "—"} |`),
      "",
      "CPU time of a fork call (p50 over the calls, ms; a process's figure has a 10 ms granularity): `server` this process (API, lifecycle,",
      "engine), `child QEMU` each child's QEMU process up to the 201 (the jail's shell and tools it was exec'd from, its start, restore and",
      "the guest's re-key).",
      "",
      "| CPU | fork ×1 | fork ×10 |",
      "|---|---|---|",
      ...Object.keys(figures.cpuMs.fork1 ?? {}).map((k) => `| ${k} | ${figures.cpuMs.fork1![k]} | ${figures.cpuMs.fork10?.[k] ?? "—"} |`),
    ].join("\n");
    console.log(md);
    await writeResults("fork", figures, md);
  } finally {
    await close();
  }
}

/** Each phase's p50 over the rows, rounded to 0.1 ms. */
function phaseSummary(rows: Record<string, number>[]): Record<string, number> {
  const keys = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  return Object.fromEntries(keys.map((k) => [k, summarize(rows.map((r) => r[k] ?? 0)).p50]));
}

await main();
