/**
 * Crash safety and bounded memory (issue #11), `npm run bench -- faults`:
 * - restart to healthy after a kill -9 (or SIGTERM) at a random moment of
 *   creates, suspends, resumes, execs, terminates and builds, over
 *   BENCH_FAULT_ROUNDS rounds (default 50), with the VMs lost and the
 *   resources leaked (goal: 0 and 0), the same rounds as the test
 *   (test/support/faults.ts);
 * - the server's RSS while BENCH_FLOOD_VMS VMs (default 50) each flood
 *   their exec's stdout (bounded: each answer keeps 4 MiB per stream).
 * Writes bench/results/faults.{json,md}.
 */
import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, rmdirSync } from "node:fs";
import { mkdir, rm } from "node:fs/promises";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";
import { freeLoopbackPort } from "../src/util/ports.ts";
import { detectCgroups } from "../src/vmm/jail/cgroups.ts";
import { CocoonServer } from "../test/support/cocoon-server.ts";
import { FaultHarness, faultServerEnv, seededRandom, type RoundResult } from "../test/support/faults.ts";
import { summarize, summaryTable, writeResults } from "./stats.ts";

const root = process.env.COCOON_BENCH_DIR ?? "/tmp/cocoon-bench";
const ROUNDS = Number(process.env.BENCH_FAULT_ROUNDS ?? 50);
const FLOOD_VMS = Number(process.env.BENCH_FLOOD_VMS ?? 50);
const SEED = Number(process.env.COCOON_FAULT_SEED ?? Math.floor(Math.random() * 2 ** 31));
const log = (line: string) => console.error(`[bench] ${line}`);

/** Resident set size of a process, in MiB. */
const rssMiB = (pid: number) => Number(/^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) / 1024;

/** The pid of the `cocoon server` process listening for `server` (the CLI bin runs it in-process). */
const serverPid = (server: CocoonServer) => server.process!.pid!;

async function faultRounds(): Promise<{ rounds: RoundResult[]; seed: number }> {
  const isolation = faultServerEnv("bench");
  const dataDir = join(root, "faults");
  await rm(dataDir, { recursive: true, force: true });
  await mkdir(dataDir, { recursive: true });
  const server = new CocoonServer({ dataDir, port: await freeLoopbackPort(), env: isolation.env });
  const rounds: RoundResult[] = [];
  try {
    await server.start();
    const harness = new FaultHarness(server, seededRandom(SEED), isolation);
    for (let i = 0; i < ROUNDS; i++) {
      const r = await harness.round(i % 4 === 3 ? "SIGTERM" : "SIGKILL");
      rounds.push(r);
      log(`round ${r.round} ${r.signal} after ${r.killAfterMs} ms: healthy in ${r.restartMs} ms, lost ${r.lost.length}, leaks ${r.leaks.length}`);
      for (const what of [...r.lost, ...r.leaks]) log(`  ${what}`);
    }
  } finally {
    await server.stop("SIGKILL");
    await cleanUp(dataDir, isolation.cgroupParent);
  }
  return { rounds, seed: SEED };
}

async function flood(): Promise<{ vms: number; baselineRssMiB: number; peakRssMiB: number; afterRssMiB: number; truncated: number }> {
  const dataDir = join(root, "flood");
  await rm(dataDir, { recursive: true, force: true });
  await mkdir(dataDir, { recursive: true });
  // Enough vCPU admission for FLOOD_VMS one-vCPU VMs on this host: they are idle but for the flood.
  const server = new CocoonServer({ dataDir, port: await freeLoopbackPort(), env: { COCOON_VCPU_OVERCOMMIT: String(Math.ceil(FLOOD_VMS / cpus().length) + 1) } });
  try {
    await server.start();
    const ids: string[] = [];
    for (let i = 0; i < FLOOD_VMS; i++) {
      const res = await server.call("POST", "/v1/microvms", { image: "base", memoryMiB: 256, idlePolicy: { suspendAfterSeconds: 0 } });
      if (res.status !== 201) throw new Error(`create ${i}: ${res.status} ${JSON.stringify(res.body)}`);
      ids.push(res.body.microVmId);
    }
    const pid = serverPid(server);
    const baselineRssMiB = rssMiB(pid);
    let peakRssMiB = baselineRssMiB;
    const sampler = setInterval(() => {
      if (server.process) peakRssMiB = Math.max(peakRssMiB, rssMiB(pid));
    }, 100);
    log(`${FLOOD_VMS} VMs each write 256 MiB to an exec's stdout at once`);
    const answers = await Promise.all(
      ids.map((id) => server.call("POST", `/v1/microvms/${id}/exec`, { command: "head -c 256M /dev/zero", timeoutSeconds: 600 }, { timeoutMs: 900_000 })),
    ).catch((err: unknown) => {
      if (server.process) throw err;
      throw new Error(`the server exited during the flood (${server.exitStatus()}):\n${server.output().slice(-6000)}`, { cause: err });
    });
    clearInterval(sampler);
    const truncated = answers.filter((a) => a.status === 200 && a.body.truncated?.stdout).length;
    const afterRssMiB = rssMiB(pid);
    for (const id of ids) await server.call("DELETE", `/v1/microvms/${id}`);
    return { vms: FLOOD_VMS, baselineRssMiB: round(baselineRssMiB), peakRssMiB: round(peakRssMiB), afterRssMiB: round(afterRssMiB), truncated };
  } finally {
    await server.stop("SIGKILL");
    await cleanUp(dataDir);
  }
}

/** Whatever a bench server left: its QEMUs, cgroups (under its own parent) and files. */
async function cleanUp(dataDir: string, cgroupParent?: string): Promise<void> {
  try {
    execFileSync("pkill", ["-9", "-f", `${dataDir}/`], { stdio: "ignore" });
  } catch {
    // nothing left
  }
  await new Promise((r) => setTimeout(r, 500));
  for (const mount of cgroupParent ? new Set(Object.values(detectCgroups().mounts)) : []) {
    const parent = join(mount, cgroupParent!);
    if (!existsSync(parent)) continue;
    for (const child of readdirSync(parent, { withFileTypes: true }).filter((e) => e.isDirectory())) rmdirSync(join(parent, child.name));
    rmdirSync(parent);
  }
  await rm(dataDir, { recursive: true, force: true });
}

const round = (v: number) => Math.round(v * 10) / 10;

async function main(): Promise<void> {
  const faults = await faultRounds();
  const flooded = FLOOD_VMS > 0 ? await flood() : undefined;
  const restart = summarize(faults.rounds.map((r) => r.restartMs));
  const lost = faults.rounds.reduce((n, r) => n + r.lost.length, 0);
  const leaks = faults.rounds.reduce((n, r) => n + r.leaks.length, 0);
  const results = {
    at: new Date().toISOString(),
    host: { cpus: cpus().length, memoryGiB: Math.round(totalmem() / 2 ** 30) },
    seed: faults.seed,
    rounds: faults.rounds.length,
    restartToHealthyMs: restart,
    vmsLost: lost,
    resourcesLeaked: leaks,
    flood: flooded,
  };
  const md = [
    `# Fault injection and bounded memory (${results.at})`,
    "",
    `${results.rounds} rounds (seed ${faults.seed}), every fourth a SIGTERM, the others kill -9, at a random moment (0–2.5 s) of creates, suspends, resumes, execs, terminates, image and base-shape builds.`,
    "",
    ...summaryTable("ms", [["restart to healthy", restart]]),
    "",
    `VMs lost: ${lost}. Resources leaked: ${leaks}.`,
    ...(flooded
      ? [
          "",
          `Server RSS with ${flooded.vms} VMs each writing 256 MiB to an exec's stdout at once: ${flooded.baselineRssMiB} MiB before, peak ${flooded.peakRssMiB} MiB, ${flooded.afterRssMiB} MiB after; ${flooded.truncated} answers truncated at 4 MiB per stream.`,
        ]
      : []),
    "",
  ].join("\n");
  process.stdout.write(md);
  await writeResults("faults", results, md);
}

await main();
