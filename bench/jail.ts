/**
 * Jail benchmark (`npm run bench`): what the QEMU jail (src/vmm/jail) costs.
 * Two engines over one snapshot, one jailed and one not (COCOON_JAIL=off's
 * path), launch in alternation so both see the same host load: launch from
 * snapshot to the first exec answer (direct restore and warm pool), suspend,
 * resume, and an exec round trip. Writes bench/results/jail.{json,md}.
 */
import { mkdir, rm } from "node:fs/promises";
import { cpus } from "node:os";
import { join } from "node:path";
import { startRuntime } from "../src/server/runtime.ts";
import { Engine, newVmId } from "../src/vmm/engine.ts";
import { jailConfigFromEnv } from "../src/vmm/jail/index.ts";
import { summarize, summaryTable, timed, writeResults, type Summary } from "./stats.ts";

const root = process.env.COCOON_BENCH_DIR ?? "/tmp/cocoon-bench";
const ROUNDS = Number(process.env.BENCH_JAIL_ROUNDS ?? 20);
const log = (line: string) => console.error(`[bench] ${line}`);

async function main(): Promise<void> {
  const jail = jailConfigFromEnv();
  if (!jail) throw new Error("the jail benchmark needs root (and COCOON_JAIL not off)");
  const dataDir = join(root, "jail-data");
  await rm(dataDir, { recursive: true, force: true });
  await mkdir(dataDir, { recursive: true });
  const runtime = await startRuntime({ dataDir: join(dataDir, "jailed"), assetsDir: join(root, "assets"), warmPoolSize: 1, log });
  const jailed = runtime.engine;
  const unjailed = await Engine.open({
    dataDir: join(dataDir, "unjailed"),
    assets: runtime.assets,
    accelerator: jailed.accelerator,
    warmPoolSize: 1,
    jail: false,
    log,
  });
  const image = runtime.baseImage;
  const engines = { jailed, unjailed };
  const samples: Record<string, number[]> = {};
  const add = (name: string, ms: number) => (samples[name] ??= []).push(ms);

  try {
    log(`×${ROUNDS} rounds, alternating jailed and unjailed`);
    for (let i = 0; i < ROUNDS; i++) {
      for (const [label, engine] of Object.entries(engines)) {
        const [vm, direct] = await timed(async () => {
          const vm = await engine.launch(image, { id: newVmId() });
          await vm.agent.exec({ command: ["true"] });
          return vm;
        });
        add(`${label}: launch → first exec, direct restore`, direct);
        add(`${label}: exec round trip`, (await timed(() => vm.agent.exec({ command: ["true"] })))[1]);
        add(`${label}: suspend`, (await timed(() => engine.suspend(vm.id)))[1]);
        add(`${label}: resume`, (await timed(() => engine.resume(vm.id)))[1]);
        await engine.terminate(vm.id);

        await engine.prewarm(image);
        const [pooled, warm] = await timed(async () => {
          const vm = await engine.launch(image);
          await vm.agent.exec({ command: ["true"] });
          return vm;
        });
        add(`${label}: launch → first exec, warm pool`, warm);
        await engine.terminate(pooled.id);
      }
    }
  } finally {
    await jailed.close();
    await unjailed.close();
  }

  const rows: [string, Summary][] = Object.entries(samples).map(([name, s]) => [name, summarize(s)]);
  const overhead = (figure: string) => {
    const on = summarize(samples[`jailed: ${figure}`]!).p50;
    const off = summarize(samples[`unjailed: ${figure}`]!).p50;
    return { figure, jailedP50: on, unjailedP50: off, overheadPercent: Math.round(((on - off) / off) * 1000) / 10 };
  };
  const figures = ["launch → first exec, direct restore", "launch → first exec, warm pool", "suspend", "resume", "exec round trip"].map(overhead);
  const md = [
    `# Jail overhead (${new Date().toISOString()}, ${cpus().length} cores, ${jailed.accelerator}, cgroup v${jailed.jailer!.cgroupVersion})`,
    "",
    ...summaryTable("ms", rows.sort(([a], [b]) => a.localeCompare(b))),
    "",
    "| figure | jailed p50 | unjailed p50 | overhead |",
    "|---|---|---|---|",
    ...figures.map((f) => `| ${f.figure} | ${f.jailedP50} | ${f.unjailedP50} | ${f.overheadPercent} % |`),
    "",
  ].join("\n");
  console.log(md);
  await writeResults("jail", { at: new Date().toISOString(), rounds: ROUNDS, summaries: Object.fromEntries(rows), overhead: figures }, md);
  await rm(dataDir, { recursive: true, force: true });
}

await main();
