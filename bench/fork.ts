/**
 * Named snapshots and forks of a running VM (issue #17): how long a snapshot
 * or fork pauses the source VM (a fresh guest, and one with 400 MiB of its
 * 512 MiB filled), and POST /fork → 201 with 1 and with 10 children RUNNING.
 * Writes bench/results/fork.{json,md}.
 */
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
      const [res, ms] = await timed(() => api("POST", `/v1/microvms/${id}/fork`, { count: 1 }));
      fork1.push(ms);
      for (const c of res.microVms) await api("DELETE", `/v1/microvms/${c.microVmId}`);
    }
    log(`fork ×10, ${WIDE_FORKS} times`);
    const fork10: number[] = [];
    for (let i = 0; i < WIDE_FORKS; i++) {
      const [res, ms] = await timed(() => api("POST", `/v1/microvms/${id}/fork`, { count: 10 }));
      fork10.push(ms);
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
    ].join("\n");
    console.log(md);
    await writeResults("fork", figures, md);
  } finally {
    await close();
  }
}

await main();
