import { posix } from "node:path";
import { AgentError, type AgentClient, type ExecRequest } from "../vmm/agent-client.ts";
import type { Engine, Snapshot, TemplateVm } from "../vmm/engine.ts";
import { sleep } from "../util/process.ts";
import { contextTar, type CodeArchive } from "./archive.ts";
import type { BuildLog } from "./build-log.ts";
import type { BuildPlan, BuildStep, Healthcheck } from "./dockerfile.ts";
import { validateHook, waitReadyHook, type ImageHooks } from "./hooks.ts";

/** Where the build context is unpacked in the build VM; removed before the snapshot. */
const BUILD_DIR = "/.cocoon-build";
const CONTEXT_DIR = `${BUILD_DIR}/context`;

export interface BuildJob {
  plan: BuildPlan;
  zipPath: string;
  archive: CodeArchive;
  /** qcow2 the build VM's disk is layered on (FROM's disk). */
  backingDisk: string;
  /** Becomes the snapshot directory. */
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
  /** The image's lifecycle hooks: `/ready` replaces the readiness check, `/validate` runs before the snapshot. */
  hooks?: ImageHooks;
}

/** A build that failed for a reason the user can act on (a step, readiness, timeout). */
export class BuildError extends Error {
  override name = "BuildError";
}

/**
 * Builds an image inside a microVM — never on the host: boots FROM's disk
 * with egress "internet" (RUN apt-get …), unpacks the context, runs every step
 * in order with its output in the build log, starts the app with its env,
 * workdir and user, waits until it is ready and snapshots memory + disk.
 * The build VM is gone when this returns or throws.
 */
export async function buildInVm(engine: Engine, job: BuildJob): Promise<Snapshot> {
  const { plan, log, signal } = job;
  const appPort = plan.config.appPort;
  log.line(`==> booting the build VM (${job.vcpus} vCPU, ${job.memoryMiB} MiB, egress internet)`);
  const template = await engine.bootTemplate({
    dir: job.dir,
    backingDisk: job.backingDisk,
    vcpus: job.vcpus,
    memoryMiB: job.memoryMiB,
    guestPorts: appPort ? [appPort] : [],
    egress: "internet",
  });
  let snapshotted = false;
  try {
    const agent = template.agent;
    const hasShell = await probe(agent, ["/bin/sh", "-c", "command -v tar >/dev/null && command -v cp >/dev/null"]);
    const copies = plan.steps.some((s) => s.kind === "copy");
    if (copies) await uploadContext(agent, job, hasShell);
    for (const step of plan.steps) {
      signal.throwIfAborted();
      log.line(`==> line ${step.line}: ${step.text}`);
      await runStep(agent, step, job, hasShell);
    }
    if (copies) await agent.remove(BUILD_DIR, true).catch(() => undefined);
    const config = plan.config;
    await agent.setEnv(config.env);
    if (config.argv.length > 0) {
      log.line(`==> starting the app: ${JSON.stringify(config.argv)} (user ${config.user}, workdir ${config.workdir})`);
      await agent.startApp({ argv: config.argv, env: config.env, cwd: config.workdir, user: config.user, restart: "on-failure" }).catch((err: Error) => {
        throw new BuildError(`the app could not be started: ${err.message}`);
      });
      if (!job.hooks?.hooks.ready) await waitReady(agent, job);
    } else {
      log.line("==> no CMD or ENTRYPOINT: the image has no app");
    }
    if (job.hooks?.hooks.ready) await buildHook(agent, job, "ready");
    if (job.hooks?.hooks.validate) await buildHook(agent, job, "validate");
    signal.throwIfAborted();
    log.line("==> snapshotting memory and disk");
    const snapshot = await engine.snapshot(template);
    snapshotted = true;
    return snapshot;
  } finally {
    if (!snapshotted) await engine.discardTemplate(template).catch(() => undefined);
  }
}

/** The build's lifecycle hooks (images/hooks.ts); a failure fails the build with the hook's answer as the reason. */
async function buildHook(agent: AgentClient, job: BuildJob, name: "ready" | "validate"): Promise<void> {
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

/** The context goes in as one tar unpacked by the guest's tar (a scratch image without one gets file-by-file writes). */
async function uploadContext(agent: AgentClient, job: BuildJob, hasShell: boolean): Promise<void> {
  const files = job.archive.entries.filter((e) => e.type === "file").length;
  job.log.line(`==> sending the build context (${files} files, ${job.archive.uncompressedBytes} bytes)`);
  if (!hasShell) return; // scratch: COPY writes each file itself
  await agent.mkdir(CONTEXT_DIR);
  await agent.writeFile(`${BUILD_DIR}/context.tar`, contextTar(job.zipPath, job.archive));
  await mustExec(agent, job, { command: ["tar", "-xf", `${BUILD_DIR}/context.tar`, "-C", CONTEXT_DIR] }, "unpacking the build context");
  await agent.remove(`${BUILD_DIR}/context.tar`);
}

async function runStep(agent: AgentClient, step: BuildStep, job: BuildJob, hasShell: boolean): Promise<void> {
  switch (step.kind) {
    case "run": {
      const code = await streamExec(agent, job, { command: step.command, env: step.env, cwd: step.cwd, user: step.user });
      if (code !== 0) throw new BuildError(`line ${step.line}: ${step.text.slice(0, 200)} exited with code ${code}`);
      return;
    }
    case "workdir":
      if (hasShell) await mustExec(agent, job, { command: ["mkdir", "-p", step.path] }, `line ${step.line}: WORKDIR`);
      else await agent.mkdir(step.path);
      return;
    case "copy":
      if (!hasShell) return copyWithoutShell(agent, step, job);
      await mustExec(agent, job, { command: ["/bin/sh", "-c", copyScript(step)] }, `line ${step.line}: ${step.add ? "ADD" : "COPY"}`);
      return;
    default: {
      const never: never = step;
      throw new Error(`unknown step ${String(never)}`);
    }
  }
}

/**
 * COPY/ADD in the guest's shell: sources are matched (globs included) inside
 * the unpacked context, staged, chowned, then copied over the destination so
 * that only the copied files change owner. ADD unpacks local tar archives.
 */
function copyScript(step: Extract<BuildStep, { kind: "copy" }>): string {
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  // Glob characters stay live; everything else is quoted.
  const pattern = (s: string) => (s === "." ? "." : s.split(/([*?[\]])/).map((part, i) => (i % 2 ? part : part ? q(part) : "")).join(""));
  const destIsDir = step.dest.endsWith("/");
  const stage = `${BUILD_DIR}/stage`;
  const lines = [
    "set -e",
    `cd ${q(CONTEXT_DIR)}`,
    `rm -rf ${stage}; mkdir -p ${stage}`,
    `found=0`,
    `for src in ${step.sources.map(pattern).join(" ")}; do`,
    `  if [ ! -e "$src" ] && [ ! -L "$src" ]; then echo "${step.add ? "ADD" : "COPY"}: $src: not found in the code archive (or excluded by .dockerignore)" >&2; exit 1; fi`,
    `  found=$((found+1))`,
    `  if [ -d "$src" ] && [ ! -L "$src" ]; then cp -a "$src/." ${stage}/`,
    step.add
      ? `  elif tar -tf "$src" >/dev/null 2>&1; then tar -xf "$src" -C ${stage} --no-same-owner`
      : `  elif false; then :`,
    `  elif [ ${destIsDir ? 1 : 0} = 1 ]; then cp -a "$src" ${stage}/`,
    `  else cp -a "$src" ${stage}/.single; fi`,
    `done`,
    step.chown ? `chown -R ${q(step.chown)} ${stage}` : ":",
    `if [ -e ${stage}/.single ]; then mkdir -p "$(dirname ${q(step.dest)})"; rm -rf ${q(step.dest)}; mv ${stage}/.single ${q(step.dest)};`,
    `else mkdir -p ${q(step.dest)}; cp -a ${stage}/. ${q(step.dest)}; fi`,
    `rm -rf ${stage}`,
  ];
  return lines.join("\n");
}

/** COPY into an image without a shell (scratch): literal paths only, file by file. */
async function copyWithoutShell(agent: AgentClient, step: Extract<BuildStep, { kind: "copy" }>, job: BuildJob): Promise<void> {
  const { Readable } = await import("node:stream");
  const yauzl = (await import("yauzl")).default;
  const zip = await yauzl.openPromise(job.zipPath, { lazyEntries: true, decodeStrings: false, validateEntrySizes: true, autoClose: false });
  try {
    for (const src of step.sources) {
      if (/[*?[]/.test(src)) throw new BuildError(`line ${step.line}: globs in COPY need /bin/sh in the image`);
      const matches = job.archive.entries.filter((e) => src === "." || e.path === src || e.path.startsWith(`${src}/`));
      if (!matches.length) throw new BuildError(`line ${step.line}: ${src}: not found in the code archive`);
      const single = matches.length === 1 && matches[0]!.path === src && matches[0]!.type === "file";
      for (const e of matches) {
        const rel = src === "." ? e.path : e.path === src ? posix.basename(src) : e.path.slice(src.length + 1);
        const target = single && !step.dest.endsWith("/") ? step.dest : posix.join(step.dest, single ? posix.basename(src) : rel);
        if (e.type === "dir") await agent.mkdir(target);
        else if (e.type === "file" && e.zipEntry) {
          const data = await zip.openReadStreamPromise(e.zipEntry);
          await agent.writeFile(target, Readable.from(data), { mode: e.mode.toString(8).padStart(4, "0"), user: step.chown?.split(":")[0] });
        } else throw new BuildError(`line ${step.line}: ${e.path} is a symlink; COPY of symlinks needs /bin/sh in the image`);
      }
    }
  } finally {
    zip.close();
  }
}

/** Runs a command with its output in the build log; returns the exit code. */
async function streamExec(agent: AgentClient, job: BuildJob, req: ExecRequest): Promise<number> {
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

async function mustExec(agent: AgentClient, job: BuildJob, req: ExecRequest, what: string): Promise<void> {
  const code = await streamExec(agent, job, req);
  if (code !== 0) throw new BuildError(`${what} failed with exit code ${code}`);
}

/**
 * Readiness: the HEALTHCHECK passing; else the EXPOSEd port listening in the
 * guest; else the app still running after `settleMs`. An app that exits and
 * keeps failing, or a timeout, fails the build.
 */
async function waitReady(agent: AgentClient, job: BuildJob): Promise<void> {
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
