import { spawn, type ChildProcess } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { TEST_ASSETS } from "./paths.ts";

/** The `cocoon` bin that npm links from the CLI workspace. */
export const CLI_BIN = "packages/cli/bin/cocoon.js";

export interface ServerOptions {
  dataDir: string;
  port: number;
  /** Extra environment (COCOON_*); the test assets and no warm pool unless set. */
  env?: NodeJS.ProcessEnv;
  /** Run under `--supervise`, as `npm start` does. */
  supervise?: boolean;
}

/**
 * A real `cocoon server` process started through the CLI's bin like a user
 * would, that a test can kill, signal and start again over the same data
 * directory. Its stderr accumulates in `output()`.
 */
export class CocoonServer {
  readonly url: string;
  private child: ChildProcess | undefined;
  private log = "";

  constructor(readonly opts: ServerOptions) {
    this.url = `http://127.0.0.1:${opts.port}`;
  }

  /** The server's (or supervisor's) process, while it runs. */
  get process(): ChildProcess | undefined {
    return this.child?.exitCode === null && this.child.signalCode === null ? this.child : undefined;
  }

  /** How the process ended ("running" while it runs). */
  exitStatus(): string {
    if (this.process || !this.child) return "running";
    return this.child.signalCode ? `signal ${this.child.signalCode}` : `exit code ${this.child.exitCode}`;
  }

  output(): string {
    return this.log;
  }

  /** Starts it and waits until it has logged `ready:` (`readyCount` times in all: a supervised server restarts). */
  async start(timeoutMs = 300_000): Promise<void> {
    const args = [CLI_BIN, "server", "--listen", `127.0.0.1:${this.opts.port}`, "--data-dir", this.opts.dataDir, ...(this.opts.supervise ? ["--supervise"] : [])];
    const child = spawn(process.execPath, args, {
      env: { ...process.env, COCOON_ASSETS_DIR: TEST_ASSETS, COCOON_WARM_POOL: "0", ...this.opts.env },
      stdio: ["ignore", "ignore", "pipe"],
    });
    child.stderr!.on("data", (d: Buffer) => (this.log += d.toString()));
    this.child = child;
    await this.waitForLog("ready:", this.count("ready:") + 1, timeoutMs);
  }

  /** Waits until `text` has appeared `times` times in the output (the process must stay up meanwhile). */
  async waitForLog(text: string, times: number, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.count(text) < times) {
      if (!this.process || Date.now() > deadline) throw new Error(`no "${text}" (${times}) from cocoon server:\n${this.log.slice(-4000)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  count(text: string): number {
    return this.log.split(text).length - 1;
  }

  /** Sends `signal` and waits for the process to exit; returns its exit code (null if a signal ended it). */
  async stop(signal: NodeJS.Signals): Promise<number | null> {
    const child = this.process;
    if (!child) return this.child?.exitCode ?? null;
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    child.kill(signal);
    return exited;
  }

  /** Polls GET /v1/health until it answers 200; returns how long that took. */
  async waitHealthy(timeoutMs: number): Promise<number> {
    const started = Date.now();
    for (;;) {
      const ok = await fetch(`${this.url}/v1/health`, { signal: AbortSignal.timeout(1000) }).then((r) => r.ok, () => false);
      if (ok) return Date.now() - started;
      if (Date.now() - started > timeoutMs) throw new Error(`not healthy within ${timeoutMs} ms:\n${this.log.slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  async adminKey(): Promise<string> {
    return (await readFile(join(this.opts.dataDir, "admin.key"), "utf8")).trim();
  }

  /** A JSON request with the admin key; the body is decoded when it is JSON. */
  async call(method: string, path: string, body?: unknown, opts: { timeoutMs?: number } = {}): Promise<{ status: number; body: any }> {
    const res = await fetch(`${this.url}${path}`, {
      method,
      headers: { authorization: `Bearer ${await this.adminKey()}`, ...(body !== undefined ? { "content-type": "application/json" } : {}) },
      body: body !== undefined ? JSON.stringify(body) : undefined,
      signal: AbortSignal.timeout(opts.timeoutMs ?? 120_000),
    });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // not JSON
    }
    return { status: res.status, body: parsed };
  }
}
