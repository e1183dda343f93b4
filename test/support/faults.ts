import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { detectCgroups } from "../../src/vmm/jail/cgroups.ts";
import { SOCKETS_ROOT } from "../../src/vmm/qemu.ts";
import { isAlive, processArgv } from "../../src/util/process.ts";
import type { CocoonServer } from "./cocoon-server.ts";
import { makeZip } from "./zip.ts";

/**
 * Fault injection against a real server (issue #11): each round starts
 * creates, suspends, resumes, execs, terminates and sometimes an image build
 * or a VM of a new memory size (a base-shape build), kills the server at a
 * random moment (SIGKILL, or SIGTERM for a graceful stop), starts it again and
 * checks that nothing was lost or leaked. Used by test/server/faults.test.ts
 * and, with more rounds, by bench/faults.ts.
 */

/** The server's isolation for leak checks: its own cgroup parent and VM uid range. */
export function faultServerEnv(tag: string): { env: NodeJS.ProcessEnv; cgroupParent: string; uids: { first: number; last: number } } {
  const first = 1_600_000_000 + (process.pid % 1000) * 65_536;
  const uids = { first, last: first + 65_535 };
  const cgroupParent = `cocoon-${tag}-${process.pid}`;
  return { env: { COCOON_WARM_POOL: "1", COCOON_CGROUP_PARENT: cgroupParent, COCOON_VM_UIDS: `${uids.first}-${uids.last}` }, cgroupParent, uids };
}

/** A seeded generator (mulberry32), so a failing round can be replayed with COCOON_FAULT_SEED. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Stable = "RUNNING" | "SUSPENDED";
type Op = "none" | "exec" | "suspend" | "resume" | "terminate";

export interface RoundResult {
  round: number;
  signal: "SIGKILL" | "SIGTERM";
  /** What was under way when the signal came. */
  operations: string[];
  killAfterMs: number;
  /** From the kill (or the end of a graceful stop) to /v1/health answering. */
  restartMs: number;
  /** VMs that were RUNNING or SUSPENDED and should still be, found FAILED or missing (goal: none). */
  lost: string[];
  /** Host resources or files nothing accounts for, and states left half-way (goal: none). */
  leaks: string[];
}

const TRANSIENT = ["PENDING", "SUSPENDING", "RESUMING", "TERMINATING"];
const IMAGE_ZIP = makeZip([{ name: "hello.txt", data: "hi\n" }]);

export class FaultHarness {
  /** VMs whose memory holds a marker (/dev/shm/marker = their id): checked when they run again. */
  private readonly marked = new Set<string>();
  private roundNo = 0;

  constructor(
    private readonly server: CocoonServer,
    private readonly random: () => number,
    private readonly isolation: { cgroupParent: string; uids: { first: number; last: number } },
  ) {}

  private pick<T>(items: T[]): T | undefined {
    return items.length ? items[Math.floor(this.random() * items.length)] : undefined;
  }

  private async vms(): Promise<Map<string, string>> {
    const res = await this.server.call("GET", "/v1/microvms?limit=1000");
    return new Map((res.body.microVms as { microVmId: string; state: string }[]).map((v) => [v.microVmId, v.state]));
  }

  /** One round: operations, a signal at a random moment, a restart, and the checks. */
  async round(signal: "SIGKILL" | "SIGTERM"): Promise<RoundResult> {
    const round = ++this.roundNo;
    const before = await this.vms();
    const stable = [...before].filter((e): e is [string, Stable] => e[1] === "RUNNING" || e[1] === "SUSPENDED");
    const ops = new Map<string, Op>();
    const operations: string[] = [];
    const inFlight: Promise<unknown>[] = [];
    const fire = (what: string, p: Promise<unknown>) => {
      operations.push(what);
      inFlight.push(p.catch(() => undefined));
    };
    const live = stable.length;
    if (live < 5) {
      const egress = this.random() < 0.3 ? "internet" : "none";
      // Now and then a memory size with no base snapshot yet: a base-shape build is under way.
      const memoryMiB = round % 7 === 3 ? 384 + 32 * round : 512;
      for (let i = 0; i < (live < 2 ? 2 : 1); i++) fire(`create (${memoryMiB} MiB, egress ${egress})`, this.create(memoryMiB, egress));
    }
    for (const [id, state] of stable) {
      const roll = this.random();
      const op: Op = state === "RUNNING" ? (roll < 0.25 ? "suspend" : roll < 0.5 ? "exec" : roll < 0.55 ? "terminate" : "none") : roll < 0.4 ? "resume" : roll < 0.45 ? "terminate" : "none";
      ops.set(id, op);
      if (op === "none") continue;
      const call = op === "exec" ? this.server.call("POST", `/v1/microvms/${id}/exec`, { command: "cat /dev/shm/marker" }) : op === "terminate" ? this.server.call("DELETE", `/v1/microvms/${id}`) : this.server.call("POST", `/v1/microvms/${id}/${op}`);
      fire(`${op} ${id}`, call);
    }
    if (round % 3 === 1) fire("image build", this.buildImage(round));

    const killAfterMs = Math.round(this.random() * 2500);
    await new Promise((r) => setTimeout(r, killAfterMs));
    const code = await this.server.stop(signal);
    if (signal === "SIGTERM" && code !== 0) throw new Error(`a graceful stop exited ${code}:\n${this.server.output().slice(-3000)}`);
    await Promise.all(inFlight);
    const stopped = Date.now();
    await this.server.start();
    const restartMs = Date.now() - stopped;

    const after = await this.vms();
    const lost: string[] = [];
    const leaks: string[] = [];
    for (const [id, state] of after) if (TRANSIENT.includes(state)) leaks.push(`${id} left ${state}`);
    for (const [id, was] of stable) {
      const op = ops.get(id)!;
      const now = after.get(id);
      const allowed = new Set<string>(signal === "SIGTERM" ? ["SUSPENDED"] : [was]);
      if (op === "suspend") allowed.add("SUSPENDED");
      if (op === "resume") allowed.add(signal === "SIGTERM" ? "SUSPENDED" : "RUNNING");
      if (op === "terminate") allowed.add("TERMINATED");
      if (!now || !allowed.has(now)) lost.push(`${id}: was ${was}, ${op} under way, now ${now ?? "missing"} (expected ${[...allowed].join(" or ")})`);
    }
    // Every RUNNING VM answers and still holds its memory; one SUSPENDED VM resumes with it.
    for (const [id, state] of after) if (state === "RUNNING") await this.checkMemory(id, lost);
    const suspended = this.pick([...after].filter(([id, s]) => s === "SUSPENDED" && this.marked.has(id)).map(([id]) => id));
    if (suspended) await this.checkMemory(suspended, lost);
    leaks.push(...(await this.settledLeaks()));
    return { round, signal, operations, killAfterMs, restartMs, lost, leaks };
  }

  private async create(memoryMiB: number, egress: string): Promise<void> {
    const res = await this.server.call("POST", "/v1/microvms", { image: "base", memoryMiB, network: { egress }, idlePolicy: { suspendAfterSeconds: 0 } });
    if (res.status !== 201) return;
    const id = res.body.microVmId as string;
    const marked = await this.server.call("POST", `/v1/microvms/${id}/exec`, { command: `echo ${id} > /dev/shm/marker` });
    if (marked.status === 200 && marked.body.exitCode === 0) this.marked.add(id);
  }

  private async buildImage(round: number): Promise<void> {
    const form = new FormData();
    form.set("name", `faults-${round}`);
    form.set("dockerfile", "FROM debian:bookworm-slim\nCOPY hello.txt /hello.txt\nRUN cat /hello.txt\n");
    form.set("code", new Blob([new Uint8Array(IMAGE_ZIP)]), "code.zip");
    await fetch(`${this.server.url}/v1/images`, { method: "POST", headers: { authorization: `Bearer ${await this.server.adminKey()}` }, body: form });
  }

  /** Exec answers (a resume first if it is suspended) and /dev/shm/marker, in guest memory, is still its id. */
  private async checkMemory(id: string, lost: string[]): Promise<void> {
    const res = await this.server.call("POST", `/v1/microvms/${id}/exec`, { command: "cat /dev/shm/marker 2>/dev/null || true" });
    if (res.status !== 200) lost.push(`${id}: exec answered ${res.status} ${JSON.stringify(res.body).slice(0, 300)}`);
    else if (this.marked.has(id) && res.body.stdout.trim() !== id) lost.push(`${id}: memory lost (marker "${res.body.stdout.trim()}")`);
  }

  /**
   * Leaks once the server has settled (a warm VM may be starting right after
   * a restart: what it holds appears before its process): retried for a while,
   * and only what stays unaccounted for is reported.
   */
  private async settledLeaks(): Promise<string[]> {
    let found: string[] = [];
    for (let attempt = 0; attempt < 40; attempt++) {
      found = await this.leaks();
      if (!found.length) return [];
      await new Promise((r) => setTimeout(r, 250));
    }
    return found;
  }

  /** What the host holds for this server that no VM accounts for. */
  async leaks(): Promise<string[]> {
    const dataDir = this.server.opts.dataDir;
    const rows = await this.vms();
    const leaks: string[] = [];
    // Records on disk, by process name.
    const records = new Map<string, { id: string; status: string; pooled?: boolean; uid: number; network: { egress: unknown } }>();
    for (const name of readdirSync(join(dataDir, "vms"))) {
      const path = join(dataDir, "vms", name, "vm.json");
      if (!existsSync(path)) {
        leaks.push(`vms/${name} has no record`);
        continue;
      }
      records.set(name, JSON.parse(readFileSync(path, "utf8")));
    }
    const qemus = qemuProcesses(dataDir);
    for (const [name, pids] of qemus) {
      const record = records.get(name);
      if (name.startsWith("template-")) leaks.push(`template QEMU ${name} still runs after a restart`);
      else if (!record) leaks.push(`QEMU ${name} (pid ${pids.join(",")}) has no VM record`);
      else if (!record.pooled && rows.get(record.id) !== "RUNNING") leaks.push(`QEMU of ${record.id} runs but the VM is ${rows.get(record.id) ?? "unknown"}`);
      if (pids.length > 1) leaks.push(`${name} has ${pids.length} QEMU processes`);
    }
    const uids = new Map<number, string>();
    for (const [name, r] of records) {
      if (!r.pooled && !rows.has(r.id)) leaks.push(`vms/${name} (${r.id}) is unknown to the API`);
      if (!r.pooled && rows.get(r.id) === "RUNNING" && !qemus.has(name)) leaks.push(`${r.id} is RUNNING without a QEMU`);
      if (uids.has(r.uid)) leaks.push(`uid ${r.uid} held by ${uids.get(r.uid)} and ${r.id}`);
      uids.set(r.uid, r.id);
    }
    for (const [id, state] of rows) if (state === "TERMINATED" && [...records.values()].some((r) => r.id === id)) leaks.push(`${id} is TERMINATED but its files remain`);
    // Cgroups under this server's parent belong to running QEMU processes.
    for (const mount of new Set(Object.values(detectCgroups().mounts))) {
      const parent = join(mount, this.isolation.cgroupParent);
      for (const name of existsSync(parent) ? readdirSync(parent, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name) : []) {
        if (!qemus.has(name)) leaks.push(`cgroup ${parent}/${name} without its QEMU`);
      }
    }
    // Socket directories belong to running QEMU processes.
    for (const name of existsSync(SOCKETS_ROOT) ? readdirSync(SOCKETS_ROOT) : []) {
      if (records.has(name) && !qemus.has(name)) leaks.push(`${SOCKETS_ROOT}/${name} without its QEMU`);
    }
    // passt, its files and nftables objects exist only for running VMs with egress.
    const egressUids = new Set([...records.entries()].filter(([name, r]) => qemus.has(name) && r.network.egress !== "none").map(([, r]) => r.uid));
    const inRange = (uid: number) => uid >= this.isolation.uids.first && uid <= this.isolation.uids.last;
    for (const uid of passtUids()) if (inRange(uid) && !egressUids.has(uid)) leaks.push(`passt of uid ${uid} runs without its VM`);
    for (const entry of existsSync("/run/cocoon-net") ? readdirSync("/run/cocoon-net") : []) {
      const uid = Number(entry.replace(/\.pid$/, ""));
      if (inRange(uid) && !egressUids.has(uid)) leaks.push(`/run/cocoon-net/${entry} without its VM`);
    }
    for (const uid of nftUids()) if (inRange(uid) && !egressUids.has(uid)) leaks.push(`nftables objects of uid ${uid} without its VM`);
    // Files: no template records, staging or half-built snapshots.
    const templates = join(dataDir, "templates");
    if (existsSync(templates) && readdirSync(templates).length) leaks.push(`templates/ holds ${readdirSync(templates).join(", ")}`);
    const imagesDir = join(dataDir, "images");
    for (const entry of existsSync(imagesDir) ? readdirSync(imagesDir) : []) {
      if (entry === ".staging" && readdirSync(join(imagesDir, entry)).length) leaks.push("images/.staging is not empty");
      if (entry === "base") for (const b of readdirSync(join(imagesDir, "base"))) if (b.includes(".building-")) leaks.push(`images/base/${b} left by a build`);
    }
    const images = await this.server.call("GET", "/v1/images");
    for (const img of (images.body.images ?? []) as { imageId: string; state: string }[]) {
      if (img.state === "BUILDING" || img.state === "PENDING") leaks.push(`image ${img.imageId} left ${img.state}`);
      if (img.state === "FAILED" && existsSync(join(imagesDir, img.imageId, "snapshot"))) leaks.push(`image ${img.imageId} FAILED but its snapshot remains`);
    }
    return leaks;
  }
}

/** QEMU processes of a data directory, by their -name. */
function qemuProcesses(dataDir: string): Map<string, number[]> {
  const byName = new Map<string, number[]>();
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry) || !isAlive(Number(entry))) continue;
    const argv = processArgv(Number(entry));
    if (!argv?.[0]?.endsWith("qemu-system-x86_64") || !argv.some((a) => a.includes(`${dataDir}/`))) continue;
    const name = argv[argv.indexOf("-name") + 1]!.split(",")[0]!;
    byName.set(name, [...(byName.get(name) ?? []), Number(entry)]);
  }
  return byName;
}

function passtUids(): number[] {
  const uids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    const argv = /^\d+$/.test(entry) ? processArgv(Number(entry)) : undefined;
    if (argv?.[0]?.endsWith("passt") && isAlive(Number(entry))) uids.push(Number(argv[argv.indexOf("--runas") + 1]?.split(":")[0]));
  }
  return uids;
}

function nftUids(): number[] {
  let text: string;
  try {
    text = execFileSync("nft", ["list", "table", "inet", "cocoon"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
  } catch {
    return [];
  }
  return [...text.matchAll(/(?:chain|set) (?:vm|vmnat|allow|dns)_(\d+)/g)].map((m) => Number(m[1]));
}

/** p50 and p95 of a list of numbers. */
export function percentiles(values: number[]): { p50: number; p95: number } {
  const sorted = [...values].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)] ?? NaN;
  return { p50: at(0.5), p95: at(0.95) };
}
