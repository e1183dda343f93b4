/**
 * Baselines for the density and launch figures, measured on this host with
 * Debian's packages: bubblewrap namespaces (`bwrap`), a `runc` container,
 * gVisor (`runsc`), and a QEMU cold boot of the base image to agent-ready
 * (the engine's own, as in bench/engine.ts). For each sandbox: start → first
 * line of its command's output, start → exit, and one idle sandbox's memory
 * (PSS of its process tree) and CPU over BENCH_IDLE_SECONDS. The container
 * root is a busybox-static tree. Writes bench/results/baselines.{json,md}.
 */
import { execFileSync, spawn } from "node:child_process";
import { copyFile, mkdir, readdir, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { prepareBaseRootfs } from "../src/images/base-rootfs.ts";
import { detectAccelerator } from "../src/vmm/accelerator.ts";
import { Engine } from "../src/vmm/engine.ts";
import { qemuBuild } from "../src/vmm/snapshot.ts";
import { prepareGuestAssets } from "../src/vmm/guest/index.ts";
import { sleep } from "../src/util/process.ts";
import { summarize, summaryTable, timed, writeResults, type Summary } from "./stats.ts";

const root = process.env.COCOON_BENCH_DIR ?? "/tmp/cocoon-bench";
const RUNS = Number(process.env.BENCH_BASELINE_RUNS ?? 20);
const COLD_BOOTS = Number(process.env.BENCH_COLD_BOOTS ?? 3);
const IDLE_SECONDS = Number(process.env.BENCH_IDLE_SECONDS ?? 30);
const TICKS_PER_SECOND = 100;
/** The base image's default shape. */
const MEMORY_MIB = 512;
const log = (line: string) => console.error(`[bench] ${line}`);

/** An OCI bundle whose root is busybox-static (read-only), running `args`. */
async function bundle(dir: string, args: string[]): Promise<void> {
  await rm(dir, { recursive: true, force: true });
  for (const d of ["bin", "proc", "dev", "tmp"]) await mkdir(join(dir, "rootfs", d), { recursive: true });
  await copyFile("/bin/busybox", join(dir, "rootfs", "bin", "busybox"));
  for (const applet of ["sh", "echo", "sleep", "true"]) await symlink("busybox", join(dir, "rootfs", "bin", applet));
  execFileSync("runc", ["spec", "--bundle", dir]);
  const spec = JSON.parse(await readFile(join(dir, "config.json"), "utf8"));
  spec.process.args = args;
  spec.process.terminal = false;
  await writeFile(join(dir, "config.json"), JSON.stringify(spec));
}

/** The command line of each sandbox running `args` (`name` distinguishes containers). */
function sandboxes(bundleDir: string, args: string[], name: string): Record<string, string[]> {
  return {
    bwrap: ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", join(bundleDir, "rootfs"), "/", "--proc", "/proc", "--dev", "/dev", ...args],
    runc: ["runc", "run", "--bundle", bundleDir, name],
    runsc: ["runsc", "--network=none", "run", "--bundle", bundleDir, name],
  };
}

/** Runs argv; resolves with the time to its first output and to its exit, in ms. */
function run(argv: string[]): Promise<{ firstOutputMs: number; exitMs: number }> {
  const t = performance.now();
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
    let first = 0;
    let stderr = "";
    child.stdout.on("data", () => (first ||= performance.now() - t));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("error", reject);
    child.on("exit", (code) => (code === 0 && first ? resolve({ firstOutputMs: first, exitMs: performance.now() - t }) : reject(new Error(`${argv.join(" ")}: exit ${code}: ${stderr}`))));
  });
}

/** `pid` and its descendants. */
async function processTree(pid: number): Promise<number[]> {
  const parents = new Map<number, number[]>();
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await readFile(`/proc/${entry}/stat`, "utf8").catch(() => "");
    const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
    parents.set(ppid, [...(parents.get(ppid) ?? []), Number(entry)]);
  }
  const tree = [pid];
  for (let i = 0; i < tree.length; i++) tree.push(...(parents.get(tree[i]!) ?? []));
  return tree;
}

async function treeCpuSeconds(pids: number[]): Promise<number> {
  let sum = 0;
  for (const pid of pids) {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    sum += (Number(f[11] ?? 0) + Number(f[12] ?? 0)) / TICKS_PER_SECOND;
  }
  return sum;
}

async function treePssMiB(pids: number[]): Promise<number> {
  let sum = 0;
  for (const pid of pids) {
    const rollup = await readFile(`/proc/${pid}/smaps_rollup`, "utf8").catch(() => "");
    sum += Number(/^Pss:\s+(\d+) kB/m.exec(rollup)?.[1] ?? 0) / 1024;
  }
  return sum;
}

/** One sandbox idling (`sleep`): PSS of its process tree and its CPU over IDLE_SECONDS. */
async function idle(argv: string[]): Promise<{ pssMiB: number; cpuPercentOfCore: number }> {
  const child = spawn(argv[0]!, argv.slice(1), { stdio: "ignore" });
  try {
    await sleep(3000);
    const tree = await processTree(child.pid!);
    const before = await treeCpuSeconds(tree);
    await sleep(IDLE_SECONDS * 1000);
    const cpu = (await treeCpuSeconds(tree)) - before;
    return { pssMiB: Math.round((await treePssMiB(tree)) * 10) / 10, cpuPercentOfCore: Math.round((cpu / IDLE_SECONDS) * 100 * 1000) / 1000 };
  } finally {
    child.kill("SIGKILL");
    await new Promise((r) => child.once("exit", r));
  }
}

async function main(): Promise<void> {
  const work = join(root, "baselines");
  await mkdir(work, { recursive: true });
  const echo = join(work, "echo");
  const idler = join(work, "idle");
  await bundle(echo, ["/bin/echo", "ready"]);
  await bundle(idler, ["/bin/sleep", String(IDLE_SECONDS + 60)]);
  const figures: Record<string, { firstOutputMs: Summary; exitMs: Summary; idle: { pssMiB: number; cpuPercentOfCore: number } } | { error: string }> = {};
  for (const kind of ["bwrap", "runc", "runsc"] as const) {
    log(`${kind}: start → first output ×${RUNS}, then one idle`);
    try {
      const first: number[] = [];
      const exit: number[] = [];
      for (let i = 0; i < RUNS; i++) {
        const r = await run(sandboxes(echo, ["/bin/echo", "ready"], `cocoon-bench-${process.pid}-${i}`)[kind]!);
        first.push(r.firstOutputMs);
        exit.push(r.exitMs);
      }
      const idleFigures = await idle(sandboxes(idler, ["/bin/sleep", String(IDLE_SECONDS + 60)], `cocoon-bench-${process.pid}-idle`)[kind]!);
      if (kind !== "bwrap") execFileSync(kind, ["delete", "--force", `cocoon-bench-${process.pid}-idle`], { stdio: "ignore" });
      figures[kind] = { firstOutputMs: summarize(first), exitMs: summarize(exit), idle: idleFigures };
    } catch (err) {
      figures[kind] = { error: (err as Error).message.slice(0, 500) };
      log(`${kind}: ${(err as Error).message}`);
    }
  }

  log(`QEMU cold boot to agent-ready ×${COLD_BOOTS}`);
  const dataDir = join(root, "baselines-data");
  await rm(dataDir, { recursive: true, force: true });
  const assetsDir = join(root, "assets");
  const assets = await prepareGuestAssets(assetsDir, log);
  const rootfs = await prepareBaseRootfs(assetsDir, log);
  const engine = await Engine.open({ dataDir, assets, accelerator: await detectAccelerator({ ...assets, cacheDir: assetsDir, log }), warmPoolSize: 0, log });
  const cold: number[] = [];
  try {
    for (let i = 0; i < COLD_BOOTS; i++) {
      const dir = join(dataDir, `cold-${i}`);
      const [template, ms] = await timed(() => engine.bootTemplate({ dir, backingDisk: rootfs, vcpus: 1, memoryMiB: MEMORY_MIB }));
      cold.push(ms);
      await engine.discardTemplate(template);
      await rm(dir, { recursive: true, force: true });
    }
  } finally {
    await engine.close();
  }
  const versions = {
    bwrap: execFileSync("bwrap", ["--version"]).toString().trim(),
    runc: execFileSync("runc", ["--version"]).toString().split("\n")[0]!.trim(),
    runsc: execFileSync("runsc", ["--version"]).toString().split("\n")[0]!.trim(),
    qemu: qemuBuild(),
  };
  const rows: [string, Summary][] = [];
  const idleLines: string[] = [];
  for (const [kind, f] of Object.entries(figures)) {
    if ("error" in f) {
      idleLines.push(`- ${kind}: could not run here: ${f.error}`);
      continue;
    }
    rows.push([`${kind}: start → first output`, f.firstOutputMs], [`${kind}: start → exit`, f.exitMs]);
    idleLines.push(`- ${kind} idle: ${f.idle.pssMiB} MiB PSS, ${f.idle.cpuPercentOfCore} % of a core`);
  }
  rows.push([`QEMU cold boot → agent ready (${engine.accelerator}, ${MEMORY_MIB} MiB)`, summarize(cold)]);
  const md = [
    `# Baselines (${new Date().toISOString()})`,
    "",
    `Debian's sandboxes on this host running busybox's \`echo ready\` (${Object.values(versions).join("; ")}; runsc on its default platform), and a cold boot of the base image's VM to its agent.`,
    "",
    ...summaryTable("ms", rows),
    "",
    ...idleLines,
    "",
  ].join("\n");
  await writeResults("baselines", { at: new Date().toISOString(), accelerator: engine.accelerator, versions, ...figures, qemuColdBootMs: summarize(cold) }, md);
  console.log(md);
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
