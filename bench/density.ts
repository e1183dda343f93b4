/**
 * Density benchmark, with the server's default settings (COCOON_* from the
 * environment, as `cocoon server` reads them): creates idle 256 MiB base VMs
 * one after another until BENCH_DENSITY_VMS (200) or the first refusal, then
 * measures, with all of them idle, the host CPU each one's QEMU and the server
 * use over BENCH_IDLE_SECONDS (30, from each thread's schedstat), host memory per VM
 * (PSS of each QEMU, /proc/<pid>/smaps_rollup) and exec round trips among
 * them. Writes bench/results/density.{json,md}.
 */
import { mkdir, readdir, readFile, rm } from "node:fs/promises";
import { cpus } from "node:os";
import { join } from "node:path";
import { buildApi } from "../src/api/server.ts";
import { ImageCatalog } from "../src/images/catalog.ts";
import { MicroVmService } from "../src/lifecycle/microvms.ts";
import { bootstrapAdminKey } from "../src/server/bootstrap.ts";
import { resolveServerConfig } from "../src/server/config.ts";
import { startRuntime } from "../src/server/runtime.ts";
import { hostCapacity } from "../src/lifecycle/microvms.ts";
import { openDatabase } from "../src/store/db.ts";
import { ServerSecrets } from "../src/store/secrets.ts";
import { ServerMetrics } from "../src/telemetry/metrics.ts";
import { VmSampler } from "../src/telemetry/vm-samples.ts";
import { sleep } from "../src/util/process.ts";
import { summarize, summaryTable, timed, writeResults } from "./stats.ts";

const root = process.env.COCOON_BENCH_DIR ?? "/tmp/cocoon-bench";
const VMS = Number(process.env.BENCH_DENSITY_VMS ?? 200);
const IDLE_SECONDS = Number(process.env.BENCH_IDLE_SECONDS ?? 30);
const EXECS = Number(process.env.BENCH_DENSITY_EXECS ?? 100);
const MEMORY_MIB = 256;
const log = (line: string) => console.error(`[bench] ${line}`);

/**
 * CPU time of a process's main thread (QEMU's main loop: timers, devices, slirp) and of its other
 * threads (vCPU, RCU, I/O workers), in seconds: from each thread's schedstat, in nanoseconds (an
 * idle VM uses a few clock ticks in 30 s, below what /proc/<pid>/stat's 10 ms ticks resolve).
 */
async function cpuSecondsByThread(pid: number): Promise<{ main: number; other: number }> {
  const split = { main: 0, other: 0 };
  for (const tid of await readdir(`/proc/${pid}/task`).catch(() => [] as string[])) {
    const schedstat = await readFile(`/proc/${pid}/task/${tid}/schedstat`, "utf8").catch(() => "0");
    split[Number(tid) === pid ? "main" : "other"] += Number(schedstat.split(" ")[0]) / 1e9;
  }
  return split;
}

/**
 * Where a QEMU's PSS lies, in MiB: guest RAM (the snapshot's memory file,
 * mapped copy-on-write), TCG's translated-code cache (the one anonymous
 * mapping that is writable and executable: src/vmm/qemu.ts's TCG_CODE_CACHE_MIB)
 * and the rest (QEMU's heap, TCG's TLBs, libraries, device buffers).
 */
async function pssBreakdownMiB(pid: number): Promise<{ guestRam: number; codeCache: number; rest: number }> {
  const split = { guestRam: 0, codeCache: 0, rest: 0 };
  let kind: keyof typeof split = "rest";
  for (const line of (await readFile(`/proc/${pid}/smaps`, "utf8")).split("\n")) {
    const mapping = /^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (mapping) {
      const [, perms, name] = mapping;
      kind = name!.endsWith("/memory") ? "guestRam" : !name && perms === "rwxp" ? "codeCache" : "rest";
      continue;
    }
    const pss = /^Pss:\s+(\d+) kB/.exec(line);
    if (pss) split[kind] += Number(pss[1]) / 1024;
  }
  return split;
}

/** Proportional set size of a process, in MiB. */
async function pssMiB(pid: number): Promise<number> {
  const rollup = await readFile(`/proc/${pid}/smaps_rollup`, "utf8");
  return Number(/^Pss:\s+(\d+) kB/m.exec(rollup)?.[1] ?? NaN) / 1024;
}

async function main(): Promise<void> {
  const dataDir = join(root, "density-data");
  await rm(dataDir, { recursive: true, force: true });
  await mkdir(dataDir, { recursive: true });
  const config = resolveServerConfig({ dataDir, assetsDir: join(root, "assets") });
  const db = await openDatabase(dataDir);
  const secrets = await ServerSecrets.open(dataDir);
  const adminKey = (await bootstrapAdminKey(db, secrets, dataDir))!;
  const runtime = await startRuntime({ ...config, log });
  const images = new ImageCatalog(runtime.engine, { db, imagesDir: join(dataDir, "images"), assetsDir: config.assetsDir, rootfs: runtime.rootfs, assets: runtime.assets, log });
  const metrics: ServerMetrics = new ServerMetrics({ vmsByState: () => microvms.countByState(), capacity: () => microvms.usage() });
  const capacity = hostCapacity({ vcpu: config.vcpuOvercommit, memory: config.memoryOvercommit }, config.memory);
  const microvms: MicroVmService = new MicroVmService({ db, engine: runtime.engine, images, capacity, observer: metrics, log });
  await microvms.start();
  const sampler = new VmSampler();
  sampler.start(async () => runtime.engine.list().filter((vm) => vm.status === "running"));
  const app = await buildApi({ db, secrets, microvms, accelerator: runtime.engine.accelerator, metrics, sampler });
  await app.listen({ host: "127.0.0.1", port: 0 });
  const port = (app.server.address() as { port: number }).port;
  const api = async (method: string, path: string, body?: unknown) => {
    const res = await fetch(`http://127.0.0.1:${port}${path}`, {
      method,
      headers: { authorization: `Bearer ${adminKey}`, ...(body ? { "content-type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    return { status: res.status, body: (await res.json()) as any };
  };
  try {
    log(`creating up to ${VMS} idle ${MEMORY_MIB} MiB VMs`);
    const ids: string[] = [];
    const create: number[] = [];
    let refusal: string | undefined;
    while (ids.length < VMS) {
      const [res, ms] = await timed(() => api("POST", "/v1/microvms", { image: "base", memoryMiB: MEMORY_MIB, idlePolicy: { suspendAfterSeconds: 0 } }));
      if (res.status !== 201) {
        refusal = `${res.status} ${res.body.error?.code}: ${res.body.error?.message}`;
        log(`refused after ${ids.length}: ${refusal}`);
        break;
      }
      ids.push(res.body.microVmId);
      create.push(ms);
      if (ids.length % 10 === 0) log(`${ids.length} running`);
    }
    const vms = ids.map((id) => runtime.engine.get(id));
    const pids = vms.map((vm) => vm.record.pid!);
    log(`${ids.length} VMs; settling 10 s, then ${IDLE_SECONDS} s idle`);
    await sleep(10_000);
    const hostStat = async () => (await readFile("/proc/stat", "utf8")).split("\n")[0]!.split(/\s+/).slice(1).map(Number);
    // The guest's own view of idleness: its local timer interrupts (LOC) per second in the first VM.
    const guestTimer = async () => {
      const res = await api("POST", `/v1/microvms/${ids[0]}/exec`, { command: ["cat", "/proc/interrupts"] });
      return Number(/^\s*LOC:\s+(\d+)/m.exec(res.body.stdout ?? "")?.[1] ?? NaN);
    };
    const locBefore = await guestTimer();
    const threadsBefore = await Promise.all(pids.map(cpuSecondsByThread));
    const serverBefore = process.cpuUsage();
    const hostBefore = await hostStat();
    const t0 = performance.now();
    await sleep(IDLE_SECONDS * 1000);
    const elapsed = (performance.now() - t0) / 1000;
    const threadsAfter = await Promise.all(pids.map(cpuSecondsByThread));
    const mainSeconds = threadsAfter.reduce((sum, t, i) => sum + t.main - threadsBefore[i]!.main, 0);
    const otherSeconds = threadsAfter.reduce((sum, t, i) => sum + t.other - threadsBefore[i]!.other, 0);
    const serverUsage = process.cpuUsage(serverBefore);
    const hostAfter = await hostStat();
    const guestTimerPerSecond = (await guestTimer()) - locBefore;
    const perVmPercent = threadsAfter.map((a, i) => ((a.main + a.other - threadsBefore[i]!.main - threadsBefore[i]!.other) / elapsed) * 100);
    const qemuTotalPercent = perVmPercent.reduce((a, b) => a + b, 0);
    const serverPercent = ((serverUsage.user + serverUsage.system) / 1e6 / elapsed) * 100;
    const hostDelta = hostAfter.map((v, i) => v - hostBefore[i]!);
    const hostTotal = hostDelta.reduce((a, b) => a + b, 0);
    const hostBusyPercent = ((hostTotal - hostDelta[3]! - hostDelta[4]!) / hostTotal) * 100 * cpus().length; // of one core
    const pss = await Promise.all(pids.map(pssMiB));
    const breakdowns = await Promise.all(pids.map(pssBreakdownMiB));
    const meanOf = (key: "guestRam" | "codeCache" | "rest") => round(breakdowns.reduce((sum, b) => sum + b[key], 0) / Math.max(1, breakdowns.length), 1);

    log(`exec ×${EXECS} among them`);
    const exec: number[] = [];
    for (let i = 0; i < EXECS && ids.length; i++) {
      const id = ids[Math.floor(Math.random() * ids.length)]!;
      const [res, ms] = await timed(() => api("POST", `/v1/microvms/${id}/exec`, { command: ["true"] }));
      if (res.status !== 200 || res.body.exitCode !== 0) throw new Error(`exec in ${id}: ${res.status} ${JSON.stringify(res.body)}`);
      exec.push(ms);
    }

    const round = (v: number, digits = 2) => Math.round(v * 10 ** digits) / 10 ** digits;
    const figures = {
      vmsRequested: VMS,
      vmsAdmitted: ids.length,
      refusal,
      createMs: summarize(create),
      idleSeconds: round(elapsed, 1),
      idleCpuPercentOfCorePerVm: { mean: round(qemuTotalPercent / Math.max(1, ids.length), 3), ...summarize(perVmPercent) },
      idleCpuPercentOfCore: { qemuTotal: round(qemuTotalPercent), server: round(serverPercent), hostBusy: round(hostBusyPercent) },
      /** Where the QEMUs' idle CPU went: QEMU's main loop, or its other threads (the vCPU running the guest, RCU, I/O workers). */
      idleCpuShare: { mainLoop: round(mainSeconds / Math.max(1e-9, mainSeconds + otherSeconds)), otherThreads: round(otherSeconds / Math.max(1e-9, mainSeconds + otherSeconds)) },
      guestTimerInterruptsPerSecond: round(guestTimerPerSecond / elapsed, 1),
      pssMiBPerVm: { mean: round(pss.reduce((a, b) => a + b, 0) / Math.max(1, pss.length), 1), ...summarize(pss) },
      pssMiBPerVmBreakdown: { guestRam: meanOf("guestRam"), tcgCodeCache: meanOf("codeCache"), rest: meanOf("rest") },
      execMs: summarize(exec),
      load: (await readFile("/proc/loadavg", "utf8")).trim(),
    };
    const md = [
      `# Density benchmark (${new Date().toISOString()})`,
      "",
      `Accelerator **${runtime.engine.accelerator}**, ${cpus().length} cores, default settings; idle base VMs of ${MEMORY_MIB} MiB, 1 vCPU, created one after another.`,
      "",
      `- VMs admitted: **${ids.length}** of ${VMS} requested${refusal ? ` (then: ${refusal})` : ""}`,
      `- Idle host CPU per VM (its QEMU, over ${figures.idleSeconds} s): **${figures.idleCpuPercentOfCorePerVm.mean} % of a core** (p95 ${figures.idleCpuPercentOfCorePerVm.p95} %)`,
      `- Idle host CPU in all, % of one core: QEMUs ${figures.idleCpuPercentOfCore.qemuTotal} (${Math.round(figures.idleCpuShare.mainLoop * 100)} % of it in their main loops, the rest in vCPU and other threads), server ${figures.idleCpuPercentOfCore.server}; whole host (other work included) ${figures.idleCpuPercentOfCore.hostBusy}`,
      `- Guest timer interrupts per second in an idle VM: ${figures.guestTimerInterruptsPerSecond}`,
      `- Host memory per VM (PSS of its QEMU): **${figures.pssMiBPerVm.mean} MiB** (p95 ${figures.pssMiBPerVm.p95})`,
      `- of which guest RAM ${figures.pssMiBPerVmBreakdown.guestRam} MiB, TCG's translated code ${figures.pssMiBPerVmBreakdown.tcgCodeCache} MiB, QEMU's own ${figures.pssMiBPerVmBreakdown.rest} MiB`,
      `- Load average at the end: ${figures.load}`,
      "",
      ...summaryTable("ms", [
        ["POST /v1/microvms → 201 RUNNING (one after another)", figures.createMs],
        ["exec `true` among the idle VMs", figures.execMs],
      ]),
      "",
    ].join("\n");
    await writeResults("density", { at: new Date().toISOString(), accelerator: runtime.engine.accelerator, ...figures }, md);
    console.log(md);
  } finally {
    microvms.stop();
    sampler.stop();
    await app.close();
    for (const v of runtime.engine.list()) await runtime.engine.terminate(v.id).catch(() => undefined);
    await runtime.engine.close();
    await db.destroy();
  }
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
