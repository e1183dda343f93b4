import { createReadStream, createWriteStream } from "node:fs";
import { posix } from "node:path";
import { Readable, Transform, type Writable } from "node:stream";
import { pipeline } from "node:stream/promises";
import tar from "tar-stream";
import { AgentError, type AgentClient, type ExecRequest } from "../vmm/agent-client.ts";
import type { DiskChain, Engine, Snapshot } from "../vmm/engine.ts";
import { sleep } from "../util/process.ts";
import { contextTar, type CodeArchive } from "./archive.ts";
import type { BuildLog } from "./build-log.ts";
import { describeBase, type BuildPlan, type BuildStep, type Healthcheck } from "./dockerfile.ts";
import { validateHook, waitReadyHook, type ImageHooks } from "./hooks.ts";

/** Where the build context is unpacked in the build VM; removed before the snapshot. */
const BUILD_DIR = "/.cocoon-build";
const CONTEXT_DIR = `${BUILD_DIR}/context`;

export interface StageJob {
  plan: BuildPlan;
  /** The stage this VM builds (an index into plan.stages). */
  stage: number;
  zipPath: string;
  archive: CodeArchive;
  /** The disk the build VM's disk is layered on (the stage's base's), with its trusted backing chain. */
  base: DiskChain;
  /** Becomes the snapshot directory (the image's, or a stage's whose disk a later stage builds on). */
  dir: string;
  vcpus: number;
  memoryMiB: number;
  log: BuildLog;
  /** Aborted at the build timeout. */
  signal: AbortSignal;
  /** Longest wait for the app to become ready. */
  readyTimeoutMs: number;
  /** Without HEALTHCHECK or EXPOSE: how long the app must stay up. */
  settleMs: number;
  /** Tars (on the host) of what earlier stages exported, by stage index: the sources of COPY --from. */
  imports: Map<number, string>;
  /** Where this stage's exports go (a tar on the host), when later stages COPY --from it. */
  exportTo?: string;
  /** Snapshot the VM (the target, or a stage a later FROM builds on); otherwise it is discarded after its steps. */
  keep: boolean;
  /** The image's lifecycle hooks (target stage): `/ready` replaces the readiness check, `/validate` runs before the snapshot. */
  hooks?: ImageHooks;
}

/** A build that failed for a reason the user can act on (a step, readiness, timeout). */
export class BuildError extends Error {
  override name = "BuildError";
}

/** Exports of a stage (COPY --from) larger than this fail the build. */
const MAX_EXPORT_BYTES = 4 * 2 ** 30;

/**
 * Builds one stage of an image inside a microVM — never on the host: boots
 * the stage's base disk with egress "internet" (RUN apt-get …), unpacks the
 * context, runs every step in order with its output in the build log, then
 * hands over what later stages copy (`exportTo`). The target stage also
 * starts the app with its env, workdir and user, waits until it is ready and
 * is snapshotted (memory + disk). The build VM is gone when this returns or
 * throws.
 */
export async function buildStage(engine: Engine, job: StageJob): Promise<Snapshot | undefined> {
  const { plan, log, signal } = job;
  const stage = plan.stages[job.stage]!;
  const target = job.stage === plan.target;
  const config = stage.config;
  const appPort = target ? config.appPort : undefined;
  const label = plan.order.length > 1 ? `stage ${stage.name ?? stage.index} (FROM ${describeBase(stage.base, plan.stages)}): ` : "";
  log.line(`==> ${label}booting the build VM (${job.vcpus} vCPU, ${job.memoryMiB} MiB, egress internet)`);
  const template = await engine.bootTemplate({
    dir: job.dir,
    backingDisk: job.base.path,
    backingChain: job.base.backing,
    vcpus: job.vcpus,
    memoryMiB: job.memoryMiB,
    guestPorts: appPort ? [appPort] : [],
    egress: "internet",
  });
  let ended = false;
  try {
    const agent = template.agent;
    const hasShell = await probe(agent, ["/bin/sh", "-c", "command -v tar >/dev/null && command -v cp >/dev/null"]);
    const copies = stage.steps.some((s) => s.kind === "copy" && s.from === undefined);
    if (copies) await uploadContext(agent, job, hasShell);
    const imported = new Set<number>();
    for (const step of stage.steps) {
      signal.throwIfAborted();
      log.line(`==> line ${step.line}: ${step.text}`);
      if (step.kind === "copy" && step.from !== undefined && hasShell && !imported.has(step.from)) {
        await importStage(agent, job, step.from);
        imported.add(step.from);
      }
      await runStep(agent, step, job, hasShell);
    }
    if (job.exportTo) await exportStage(agent, job, hasShell);
    await agent.remove(BUILD_DIR, true).catch(() => undefined);
    if (!job.keep) {
      ended = true;
      await engine.discardTemplate(template);
      return undefined;
    }
    await agent.setEnv(config.env);
    if (target && config.argv.length > 0) {
      log.line(`==> starting the app: ${JSON.stringify(config.argv)} (user ${config.user}, workdir ${config.workdir})`);
      await agent
        .startApp({ argv: config.argv, env: config.env, cwd: config.workdir, user: config.user, restart: "on-failure", stopSignal: config.stopSignal })
        .catch((err: Error) => {
          throw new BuildError(`the app could not be started: ${err.message}`);
        });
      if (!job.hooks?.hooks.ready) await waitReady(agent, job);
    } else if (target) {
      log.line("==> no CMD or ENTRYPOINT: the image has no app");
    }
    if (target && job.hooks?.hooks.ready) await buildHook(agent, job, "ready");
    if (target && job.hooks?.hooks.validate) await buildHook(agent, job, "validate");
    signal.throwIfAborted();
    log.line(target ? "==> snapshotting memory and disk" : `==> ${label}keeping its disk for the stages built on it`);
    ended = true;
    return await engine.snapshot(template);
  } finally {
    if (!ended) await engine.discardTemplate(template).catch(() => undefined);
  }
}

/** The build's lifecycle hooks (images/hooks.ts); a failure fails the build with the hook's answer as the reason. */
async function buildHook(agent: AgentClient, job: StageJob, name: "ready" | "validate"): Promise<void> {
  const hooks = job.hooks!;
  job.log.line(`==> ${name} hook: POST /${name} on port ${hooks.port} (timeout ${hooks.hooks[name]!.timeoutSeconds} s)`);
  try {
    job.log.line(`==> ${name === "ready" ? await waitReadyHook(agent, hooks, job.signal) : await validateHook(agent, hooks)}`);
  } catch (err) {
    job.signal.throwIfAborted();
    throw new BuildError((err as Error).message);
  }
}

async function probe(agent: AgentClient, argv: string[]): Promise<boolean> {
  try {
    return (await agent.exec({ command: argv, timeoutMs: 30_000 })).exitCode === 0;
  } catch (err) {
    if (err instanceof AgentError && (err.code === "CommandNotFound" || err.code === "BadRequest")) return false;
    throw err;
  }
}

/** The context goes in as one tar unpacked by the guest's tar (an image without one gets file-by-file writes). */
async function uploadContext(agent: AgentClient, job: StageJob, hasShell: boolean): Promise<void> {
  const files = job.archive.entries.filter((e) => e.type === "file").length;
  job.log.line(`==> sending the build context (${files} files, ${job.archive.uncompressedBytes} bytes)`);
  if (!hasShell) return; // scratch: COPY writes each file itself
  await agent.mkdir(CONTEXT_DIR);
  await agent.writeFile(`${BUILD_DIR}/context.tar`, contextTar(job.zipPath, job.archive));
  await mustExec(agent, job, { command: ["tar", "-xf", `${BUILD_DIR}/context.tar`, "-C", CONTEXT_DIR] }, "unpacking the build context");
  await agent.remove(`${BUILD_DIR}/context.tar`);
}

/** Where an earlier stage's exports are unpacked in this build VM. */
const importDir = (stage: number) => `${BUILD_DIR}/from-${stage}`;

/** Unpacks what stage `from` exported into importDir(from), owners and modes kept. */
async function importStage(agent: AgentClient, job: StageJob, from: number): Promise<void> {
  const tarPath = job.imports.get(from);
  if (!tarPath) throw new Error(`stage ${from} exported nothing`);
  await agent.mkdir(importDir(from));
  await agent.writeFile(`${importDir(from)}.tar`, createReadStream(tarPath));
  await mustExec(agent, job, { command: ["tar", "-xf", `${importDir(from)}.tar`, "-C", importDir(from)] }, `unpacking what stage ${from} exported`);
  await agent.remove(`${importDir(from)}.tar`);
}

/**
 * Writes the paths later stages COPY --from this one into a tar on the host
 * (`exportTo`), globs expanded by the stage's shell. Needs /bin/sh and tar
 * in the stage; a missing path fails the build naming it.
 */
async function exportStage(agent: AgentClient, job: StageJob, hasShell: boolean): Promise<void> {
  const stage = job.plan.stages[job.stage]!;
  const what = `stage ${stage.name ?? stage.index}`;
  if (!hasShell) throw new BuildError(`COPY --from=${stage.name ?? stage.index} needs /bin/sh and tar in ${what} (it has none)`);
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  const patterns = stage.exports.map((s) => (s === "." ? "." : globPattern(s, q)));
  // The whole root: without the virtual and temporary filesystems.
  const excludes = stage.exports.includes(".") ? ["./proc", "./sys", "./dev", "./run", "./tmp", `.${BUILD_DIR}`].map((e) => `--exclude=${e}`).join(" ") : "";
  const script = [
    "set -e",
    "cd /",
    `mkdir -p ${BUILD_DIR}`,
    `for src in ${patterns.join(" ")}; do`,
    `  if [ ! -e "$src" ] && [ ! -L "$src" ]; then echo "COPY --from=${stage.name ?? stage.index}: /$src: not found in ${what}" >&2; exit 1; fi`,
    "done",
    `tar -cf ${BUILD_DIR}/export.tar ${excludes} ${patterns.join(" ")}`,
  ].join("\n");
  job.log.line(`==> ${what}: exporting ${stage.exports.map((s) => `/${s === "." ? "" : s}`).join(" ")}`);
  await mustExec(agent, job, { command: ["/bin/sh", "-c", script] }, `exporting from ${what}`);
  let bytes = 0;
  const meter = new Transform({
    transform(chunk: Buffer, _enc, done) {
      bytes += chunk.length;
      done(bytes > MAX_EXPORT_BYTES ? new BuildError(`${what} exports more than ${MAX_EXPORT_BYTES} bytes for COPY --from`) : null, chunk);
    },
  });
  await pipeline(await agent.readFile(`${BUILD_DIR}/export.tar`, job.signal), meter, createWriteStream(job.exportTo!, { mode: 0o600 }));
  job.log.line(`==> ${what}: exported ${(bytes / 2 ** 20).toFixed(1)} MiB`);
}

async function runStep(agent: AgentClient, step: BuildStep, job: StageJob, hasShell: boolean): Promise<void> {
  switch (step.kind) {
    case "run": {
      if (typeof step.command === "string" && !hasShell && !(await probe(agent, ["/bin/sh", "-c", "true"]))) {
        throw new BuildError(`line ${step.line}: RUN in shell form needs /bin/sh, which this image lacks; use the exec form (RUN ["program", "arg"])`);
      }
      const code = await streamExec(agent, job, { command: step.command, stdin: step.stdin, env: step.env, cwd: step.cwd, user: step.user });
      if (code !== 0) throw new BuildError(`line ${step.line}: ${step.text.slice(0, 200)} exited with code ${code}`);
      return;
    }
    case "mkdir":
      if (hasShell) await mustExec(agent, job, { command: ["mkdir", "-p", step.path] }, `line ${step.line}: ${step.text.split(" ")[0]}`);
      else await agent.mkdir(step.path);
      return;
    case "write":
      await agent.writeFile(step.dest, Buffer.from(step.content), { mode: step.chmod ?? "0644", user: step.chown?.split(":")[0] });
      return;
    case "copy":
      if (!hasShell) return step.from === undefined ? copyWithoutShell(agent, step, job) : copyImportWithoutShell(agent, step, job);
      await mustExec(agent, job, { command: ["/bin/sh", "-c", copyScript(step)] }, `line ${step.line}: ${step.add ? "ADD" : "COPY"}`);
      return;
    default: {
      const never: never = step;
      throw new Error(`unknown step ${String(never)}`);
    }
  }
}

/** A source with its glob characters live and the rest quoted. */
function globPattern(s: string, q: (s: string) => string): string {
  return s.split(/([*?[\]])/).map((part, i) => (i % 2 ? part : part ? q(part) : "")).join("");
}

/**
 * COPY/ADD in the guest's shell: sources are matched (globs included) inside
 * the unpacked context, staged, chowned, then copied over the destination so
 * that only the copied files change owner. ADD unpacks local tar archives.
 */
function copyScript(step: Extract<BuildStep, { kind: "copy" }>): string {
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  // Glob characters stay live; everything else is quoted.
  const pattern = (s: string) => (s === "." ? "." : globPattern(s, q));
  const destIsDir = step.dest.endsWith("/");
  const stage = `${BUILD_DIR}/stage`;
  const where = step.from === undefined ? "the code archive (or excluded by .dockerignore)" : `stage ${step.from}`;
  const lines = [
    "set -e",
    `cd ${q(step.from === undefined ? CONTEXT_DIR : importDir(step.from))}`,
    `rm -rf ${stage}; mkdir -p ${stage}`,
    `found=0`,
    `for src in ${step.sources.map(pattern).join(" ")}; do`,
    `  if [ ! -e "$src" ] && [ ! -L "$src" ]; then echo "${step.add ? "ADD" : "COPY"}: $src: not found in ${where}" >&2; exit 1; fi`,
    `  found=$((found+1))`,
    `  if [ -d "$src" ] && [ ! -L "$src" ]; then cp -a "$src/." ${stage}/`,
    step.add
      ? `  elif tar -tf "$src" >/dev/null 2>&1; then tar -xf "$src" -C ${stage} --no-same-owner`
      : `  elif false; then :`,
    `  elif [ ${destIsDir ? 1 : 0} = 1 ]; then cp -a "$src" ${stage}/`,
    `  else cp -a "$src" ${stage}/.single; name=$(basename "$src"); fi`,
    `done`,
    step.chown ? `chown -R ${q(step.chown)} ${stage}` : ":",
    step.chmod ? `chmod -R ${step.chmod} ${stage}` : ":",
    // A file copied onto an existing directory goes into it, as with Docker.
    `if [ -e ${stage}/.single ] && [ -d ${q(step.dest)} ] && [ ! -L ${q(step.dest)} ]; then mv ${stage}/.single ${q(step.dest)}/"$name";`,
    `elif [ -e ${stage}/.single ]; then mkdir -p "$(dirname ${q(step.dest)})"; rm -rf ${q(step.dest)}; mv ${stage}/.single ${q(step.dest)};`,
    `else mkdir -p ${q(step.dest)}; cp -a ${stage}/. ${q(step.dest)}; fi`,
    `rm -rf ${stage}`,
  ];
  return lines.join("\n");
}

interface SourceEntry {
  path: string;
  type: "file" | "dir" | "symlink" | "other";
  mode: number;
}

/**
 * COPY without a shell in the image (scratch, distroless): where each
 * matching entry lands, by entry path. Literal sources only; symlinks need
 * the shell's cp.
 */
function placements(step: Extract<BuildStep, { kind: "copy" }>, entries: SourceEntry[], where: string): Map<string, { entry: SourceEntry; target: string }> {
  const out = new Map<string, { entry: SourceEntry; target: string }>();
  for (const src of step.sources) {
    if (/[*?[]/.test(src)) throw new BuildError(`line ${step.line}: globs in COPY need /bin/sh in the image`);
    const matches = entries.filter((e) => src === "." || e.path === src || e.path.startsWith(`${src}/`));
    if (!matches.length) throw new BuildError(`line ${step.line}: ${src}: not found in ${where}`);
    const single = matches.length === 1 && matches[0]!.path === src && matches[0]!.type === "file";
    for (const e of matches) {
      if (e.type === "symlink" || e.type === "other") throw new BuildError(`line ${step.line}: ${e.path} is a ${e.type === "symlink" ? "symlink" : "special file"}; COPY of those needs /bin/sh in the image`);
      // A directory's contents land in dest, not the directory itself (Docker's rule).
      const rel = src === "." ? e.path : e.path === src ? (e.type === "dir" ? "" : posix.basename(src)) : e.path.slice(src.length + 1);
      const target = single && !step.dest.endsWith("/") ? step.dest : posix.join(step.dest, single ? posix.basename(src) : rel);
      out.set(e.path, { entry: e, target });
    }
  }
  return out;
}

async function writeEntry(agent: AgentClient, step: Extract<BuildStep, { kind: "copy" }>, entry: SourceEntry, target: string, data?: Readable): Promise<void> {
  if (entry.type === "dir") await agent.mkdir(target);
  else await agent.writeFile(target, data!, { mode: step.chmod ?? entry.mode.toString(8).padStart(4, "0"), user: step.chown?.split(":")[0] });
}

/** COPY from the code archive into an image without a shell, file by file through the agent. */
async function copyWithoutShell(agent: AgentClient, step: Extract<BuildStep, { kind: "copy" }>, job: StageJob): Promise<void> {
  const yauzl = (await import("yauzl")).default;
  const placed = placements(step, job.archive.entries, "the code archive");
  const zip = await yauzl.openPromise(job.zipPath, { lazyEntries: true, decodeStrings: false, validateEntrySizes: true, autoClose: false });
  try {
    for (const e of job.archive.entries) {
      const p = placed.get(e.path);
      if (p) await writeEntry(agent, step, e, p.target, e.type === "file" && e.zipEntry ? Readable.from(await zip.openReadStreamPromise(e.zipEntry)) : undefined);
    }
  } finally {
    zip.close();
  }
}

/** COPY --from a stage into an image without a shell: the stage's export tar read on the host, written file by file. */
async function copyImportWithoutShell(agent: AgentClient, step: Extract<BuildStep, { kind: "copy" }>, job: StageJob): Promise<void> {
  const tarPath = job.imports.get(step.from!)!;
  const typeOf = (t: string | null | undefined): SourceEntry["type"] => (t === "file" || t === "contiguous-file" ? "file" : t === "directory" ? "dir" : t === "symlink" ? "symlink" : "other");
  const nameOf = (n: string) => posix.normalize(n.replace(/^\/+/, "")).replace(/\/+$/, "");
  const entries: SourceEntry[] = [];
  for await (const e of tarEntries(tarPath)) {
    entries.push({ path: nameOf(e.header.name), type: typeOf(e.header.type), mode: e.header.mode ?? 0o644 });
    e.resume();
  }
  const placed = placements(step, entries.filter((e) => e.path !== "." && !e.path.startsWith("../")), `stage ${step.from}`);
  for await (const e of tarEntries(tarPath)) {
    const p = placed.get(nameOf(e.header.name));
    if (p) await writeEntry(agent, step, p.entry, p.target, p.entry.type === "file" ? e : undefined);
    e.resume();
  }
}

/** The entries of a tar on the host, each a stream of its data. */
function tarEntries(path: string): AsyncIterable<Readable & { header: tar.Header }> {
  const extract = tar.extract();
  createReadStream(path).on("error", (err) => extract.destroy(err)).pipe(extract as unknown as Writable);
  return extract as unknown as AsyncIterable<Readable & { header: tar.Header }>;
}

/** Runs a command with its output in the build log; returns the exit code. */
async function streamExec(agent: AgentClient, job: StageJob, req: ExecRequest): Promise<number> {
  try {
    for await (const ev of agent.execStream(req, job.signal)) {
      if (ev.type === "stdout" || ev.type === "stderr") job.log.write(ev.data.toString());
      else if (ev.type === "exit") return ev.timedOut ? 124 : ev.exitCode;
    }
  } catch (err) {
    job.signal.throwIfAborted();
    if (err instanceof AgentError && err.status < 500) throw new BuildError(`${typeof req.command === "string" ? req.command : req.command.join(" ")}: ${err.message}`);
    throw err;
  }
  throw new Error("the command's output ended before it exited");
}

async function mustExec(agent: AgentClient, job: StageJob, req: ExecRequest, what: string): Promise<void> {
  const code = await streamExec(agent, job, req);
  if (code !== 0) throw new BuildError(`${what} failed with exit code ${code}`);
}

/**
 * Readiness: the HEALTHCHECK passing; else the EXPOSEd port listening in the
 * guest; else the app still running after `settleMs` (or having exited with
 * code 0). An app that keeps failing, or a timeout, fails the build.
 */
async function waitReady(agent: AgentClient, job: StageJob): Promise<void> {
  const { config } = job.plan;
  const deadline = Date.now() + job.readyTimeoutMs;
  const hc = config.healthcheck;
  const what = hc ? "HEALTHCHECK" : config.appPort ? `port ${config.appPort} accepting connections` : `the app staying up for ${job.settleMs} ms`;
  job.log.line(`==> waiting for readiness: ${what}`);
  const started = Date.now();
  let failures = 0;
  let lastProblem = "";
  for (;;) {
    job.signal.throwIfAborted();
    const app = await agent.appStatus();
    if (app.state !== "running") lastProblem = `the app is ${app.state}${app.exitCode !== undefined && app.exitCode !== null ? ` (exit code ${app.exitCode})` : ""} after ${app.restarts} restarts`;
    if (hc) {
      const ok = app.state === "running" && (await healthcheck(agent, hc, config));
      if (ok) break;
      if (Date.now() - started >= hc.startPeriodMs && ++failures >= hc.retries && app.state === "running") {
        throw new BuildError(`the app never became ready: HEALTHCHECK failed ${failures} times in a row`);
      }
      if (app.state === "running") lastProblem = `HEALTHCHECK failing (${failures} consecutive)`;
    } else if (config.appPort) {
      if (app.state === "running" && (await listening(agent, config.appPort))) break;
      if (app.state === "running") lastProblem = `nothing listens on port ${config.appPort}`;
    } else if (app.state === "running" && Date.now() - started >= job.settleMs) {
      break;
    } else if (app.state === "exited" && app.exitCode === 0) {
      // A one-shot command, or an interpreter inherited as CMD (python3, node, bash) that
      // reads an empty stdin: the image is snapshotted without a running app.
      job.log.line("==> the app exited with code 0: the image has no running app (override CMD to run one)");
      return;
    }
    if (Date.now() > deadline) throw new BuildError(`the app never became ready within ${Math.round(job.readyTimeoutMs / 1000)} s (waiting for ${what}): ${lastProblem}`);
    await sleep(hc ? Math.min(hc.intervalMs, 2000) : 250);
  }
  job.log.line(`==> ready after ${((Date.now() - started) / 1000).toFixed(1)} s`);
  const logs = await agent.logs(false).catch(() => undefined);
  if (logs) {
    let text = "";
    for await (const c of logs) text += (c as Buffer).toString();
    if (text) job.log.write(text.split("\n").map((l) => (l ? `[app] ${l}` : l)).join("\n") + (text.endsWith("\n") ? "" : "\n"));
  }
}

async function healthcheck(agent: AgentClient, hc: Healthcheck, config: BuildPlan["config"]): Promise<boolean> {
  try {
    const res = await agent.exec({ command: hc.command, env: config.env, cwd: config.workdir, user: config.user, timeoutMs: hc.timeoutMs });
    return res.exitCode === 0;
  } catch {
    return false;
  }
}

async function readGuestText(agent: AgentClient, path: string): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of await agent.readFile(path)) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString();
}

/** A LISTEN socket on `port` in /proc/net/tcp{,6} (from inside the guest, so no NAT can fake a connection). */
async function listening(agent: AgentClient, port: number): Promise<boolean> {
  const hex = port.toString(16).toUpperCase().padStart(4, "0");
  try {
    // Read through the agent's file API, not `cat`: a FROM scratch image has no cat.
    const tables = await Promise.all(["/proc/net/tcp", "/proc/net/tcp6"].map((p) => readGuestText(agent, p).catch(() => "")));
    return tables.join("\n").split("\n").some((l) => {
      const f = l.trim().split(/\s+/);
      return f[1]?.endsWith(`:${hex}`) && f[3] === "0A";
    });
  } catch {
    return false;
  }
}
