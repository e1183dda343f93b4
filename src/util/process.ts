import { spawn, type SpawnOptions } from "node:child_process";
import { readFileSync } from "node:fs";

/** Thrown when a host tool exits non-zero; carries the tail of its stderr. */
export class CommandFailedError extends Error {
  constructor(
    readonly command: string,
    readonly exitCode: number | null,
    readonly stderrTail: string,
  ) {
    super(`${command} failed (exit ${exitCode}): ${stderrTail.trim() || "no output"}`);
    this.name = "CommandFailedError";
  }
}

export interface RunOpts {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Called with each chunk of combined output, for progress reporting. */
  onOutput?: (chunk: string) => void;
  timeoutMs?: number;
  /** Kills the tool (SIGKILL) when aborted; the promise then rejects with the abort reason. */
  signal?: AbortSignal;
}

/** Runs a host tool to completion and returns its stdout. */
export function run(cmd: string, args: string[], opts: RunOpts = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const spawnOpts: SpawnOptions = { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ["ignore", "pipe", "pipe"] };
    const child = spawn(cmd, args, spawnOpts);
    let stdout = "";
    let stderr = "";
    const timer = opts.timeoutMs ? setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs) : undefined;
    const onAbort = () => child.kill("SIGKILL");
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    if (opts.signal?.aborted) onAbort();
    child.stdout!.on("data", (d: Buffer) => {
      stdout += d.toString();
      opts.onOutput?.(d.toString());
    });
    child.stderr!.on("data", (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-4000);
      opts.onOutput?.(d.toString());
    });
    child.on("error", (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(err.code === "ENOENT" ? new CommandFailedError(cmd, null, `${cmd} is not installed (run scripts/setup.sh)`) : err);
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
      if (opts.signal?.aborted) reject(opts.signal.reason as Error);
      else if (code === 0) resolve(stdout);
      else reject(new CommandFailedError(`${cmd} ${args.slice(0, 3).join(" ")}`, code, stderr.slice(-1500)));
    });
  });
}

/**
 * True when a pid names a live process. A zombie counts as gone: a daemonized
 * QEMU's parent is the host's init, which may be slow (or fail) to reap it.
 */
export function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Field 3, after the parenthesised command name (which may itself hold spaces).
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

/** The process's argv, or undefined if it is gone. */
export function processArgv(pid: number): string[] | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
  } catch {
    return undefined;
  }
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
