import { randomBytes } from "node:crypto";
import { Agent, request, type IncomingMessage } from "node:http";
import type { Socket } from "node:net";
import type { Readable } from "node:stream";
import { sleep } from "../util/process.ts";

/** Thrown when cocoon-agent refuses a request; `code` is the agent's error code (agent/PROTOCOL.md). */
export class AgentError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "AgentError";
  }
}

export interface ExecRequest {
  /** argv, or a string run through `/bin/sh -c`. */
  command: string[] | string;
  env?: Record<string, string>;
  cwd?: string;
  user?: string;
  stdin?: string | Buffer;
  timeoutMs?: number;
}

export type ExecEvent =
  | { type: "started"; pid: number }
  | { type: "stdout" | "stderr"; data: Buffer }
  | { type: "exit"; exitCode: number; signal: string; timedOut: boolean; durationMs: number };

export interface ExecResult {
  exitCode: number;
  signal: string;
  timedOut: boolean;
  stdout: string;
  stderr: string;
  durationMs: number;
}

/** What the app did with a lifecycle hook call (agent/PROTOCOL.md `POST /hook`). */
export interface HookAnswer {
  /** The app's HTTP status, when it answered. */
  status?: number;
  /** The start of its answer body (at most 4 KiB). */
  body?: Buffer;
  /** Why there is no answer: refused, reset, or timed out. */
  error?: string;
  timedOut?: boolean;
  durationMs: number;
}

export interface FileEntry {
  name: string;
  type: "file" | "dir" | "symlink" | "other";
  size: number;
  mode: string;
  mtime: string;
}

type Query = Record<string, string | number | boolean | undefined>;

interface RequestOpts {
  query?: Query;
  json?: unknown;
  body?: Buffer | Readable;
  signal?: AbortSignal;
  headers?: Record<string, string>;
}

/**
 * HTTP client for one VM's cocoon-agent, reached through the VM's forwarded
 * loopback port. Keeps connections alive: a VM answers many small requests.
 */
export class AgentClient {
  private readonly agent = new Agent({ keepAlive: true, maxSockets: 64 });

  constructor(
    readonly port: number,
    private token: string,
  ) {}

  /** Drops pooled connections; they die with the QEMU process anyway. */
  close(): void {
    this.agent.destroy();
  }

  /** Polls /health until the agent answers (a cold boot) or `timeoutMs` passes. */
  async waitReady(timeoutMs: number, signal?: AbortSignal): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        // A short limit per attempt: before the guest listens, a forwarder may
        // hold the connection while it retries the guest (passt backs off in
        // seconds), where a fresh attempt would get through at once.
        const attempt = AbortSignal.timeout(1000);
        await this.json("GET", "/health", { signal: signal ? AbortSignal.any([signal, attempt]) : attempt });
        return;
      } catch (err) {
        if (signal?.aborted) throw err;
        if (Date.now() > deadline) throw new Error(`agent not ready within ${timeoutMs} ms: ${(err as Error).message}`);
        await sleep(50);
      }
    }
  }

  /**
   * Makes a restored guest unique and current: fresh kernel entropy, wall
   * clock stepped to now, its hostname, and a new secret (the old one, shared
   * with every clone of the snapshot, stops working).
   */
  async restore(opts: { newToken: string; hostname: string }): Promise<void> {
    const oldToken = this.token;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.json("POST", "/restore", {
          json: { token: opts.newToken, entropy: randomBytes(64).toString("base64"), unixTimeNs: Date.now() * 1e6, hostname: opts.hostname },
        });
        this.token = opts.newToken;
        return;
      } catch (err) {
        // The first connection into a just-restored guest is occasionally reset
        // by the forwarder (passt) before an answer. The request may have
        // re-keyed the agent even so: then the new secret already works.
        if ((err as NodeJS.ErrnoException).code !== "ECONNRESET" || attempt >= 3) throw err;
        this.token = opts.newToken;
        if (await this.appStatus().then(() => true, () => false)) return;
        this.token = oldToken;
        await sleep(50 * attempt);
      }
    }
  }

  sync(): Promise<unknown> {
    return this.json("POST", "/sync");
  }

  /** Waits for the root device to reach `sizeBytes` (the host grew it), then grows the filesystem to fill it. */
  growDisk(sizeBytes: number): Promise<{ deviceBytes: number; filesystemBytes: number; grown: boolean }> {
    return this.json("POST", "/disk/grow", { json: { sizeBytes } });
  }

  setEnv(env: Record<string, string>): Promise<unknown> {
    return this.json("PUT", "/env", { json: env });
  }

  stats(): Promise<Record<string, number>> {
    return this.json("GET", "/stats");
  }

  /** Runs a command and yields its output as it arrives. */
  async *execStream(req: ExecRequest, signal?: AbortSignal): AsyncGenerator<ExecEvent> {
    const res = await this.send("POST", "/exec", { json: toAgentExec(req), signal });
    let buffered = "";
    for await (const chunk of res) {
      buffered += chunk.toString();
      let nl: number;
      while ((nl = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (line.trim()) yield fromAgentEvent(JSON.parse(line));
      }
    }
  }

  /** Runs a command to completion. */
  async exec(req: ExecRequest, signal?: AbortSignal): Promise<ExecResult> {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    for await (const ev of this.execStream(req, signal)) {
      if (ev.type === "stdout") out.push(ev.data);
      else if (ev.type === "stderr") err.push(ev.data);
      else if (ev.type === "exit") {
        return {
          exitCode: ev.exitCode,
          signal: ev.signal,
          timedOut: ev.timedOut,
          durationMs: ev.durationMs,
          stdout: Buffer.concat(out).toString(),
          stderr: Buffer.concat(err).toString(),
        };
      }
    }
    throw new AgentError(502, "AgentDisconnected", "the agent closed the exec stream before the command exited");
  }

  /** Streams a file out of the guest. */
  async readFile(path: string, signal?: AbortSignal): Promise<IncomingMessage> {
    const res = await this.send("GET", "/files", { query: { path }, signal });
    if (!String(res.headers["content-type"]).startsWith("application/octet-stream")) {
      res.resume();
      throw new AgentError(409, "Conflict", `${path} is a directory`);
    }
    return res;
  }

  /** Streams `body` into a file in the guest (parents created, replaced atomically). */
  writeFile(path: string, body: Buffer | Readable, opts: { mode?: string; user?: string } = {}): Promise<{ path: string; size: number }> {
    return this.json("PUT", "/files", { query: { path, mode: opts.mode, user: opts.user }, body });
  }

  async list(path: string): Promise<FileEntry[]> {
    return (await this.json<{ entries: FileEntry[] }>("GET", "/files", { query: { path } })).entries;
  }

  stat(path: string): Promise<FileEntry & { path: string }> {
    return this.json("GET", "/files/stat", { query: { path } });
  }

  mkdir(path: string): Promise<unknown> {
    return this.json("POST", "/files/mkdir", { query: { path } });
  }

  remove(path: string, recursive = false): Promise<unknown> {
    return this.json("DELETE", "/files", { query: { path, recursive } });
  }

  /** Starts (or replaces) the supervised app process; `stopSignal` (default SIGTERM) is what stops it. */
  startApp(app: { argv: string[]; env?: Record<string, string>; cwd?: string; user?: string; restart?: "no" | "on-failure" | "always"; stopSignal?: string }): Promise<unknown> {
    return this.json("POST", "/app", { json: app });
  }

  appStatus(): Promise<{ state: string; pid?: number; restarts: number; exitCode?: number }> {
    return this.json("GET", "/app");
  }

  /** The app's buffered output, then (with follow) new output until the stream is destroyed. */
  logs(follow: boolean, signal?: AbortSignal): Promise<IncomingMessage> {
    return this.send("GET", "/logs", { query: { follow }, signal });
  }

  /** Opens an interactive PTY; frames are described in agent/PROTOCOL.md. */
  pty(opts: { cmd?: string; cols?: number; rows?: number; user?: string; cwd?: string }): Promise<Socket> {
    return new Promise((resolve, reject) => {
      const req = request({
        host: "127.0.0.1",
        port: this.port,
        path: `/pty${queryString(opts)}`,
        headers: { Authorization: `Bearer ${this.token}`, Connection: "Upgrade", Upgrade: "cocoon-pty" },
      });
      req.on("upgrade", (_res, socket, head) => {
        if (head.length) socket.unshift(head);
        resolve(socket);
      });
      req.on("response", (res) => errorFrom(res).then(reject, reject));
      req.on("error", reject);
      req.end();
    });
  }

  /**
   * Has the agent POST `body` to `127.0.0.1:{port}{path}` inside the guest
   * (a lifecycle hook), bounded by `timeoutMs` (1–60000); no port forwarding
   * needed. Resolves with what the app did, whether it answered or not.
   */
  async hook(req: { port: number; path: string; body?: Buffer; contentType?: string; timeoutMs: number }): Promise<HookAnswer> {
    const answer = await this.json<{ status?: number; body?: string; error?: string; timedOut?: boolean; durationMs: number }>("POST", "/hook", {
      json: { port: req.port, path: req.path, body: (req.body ?? Buffer.alloc(0)).toString("base64"), contentType: req.contentType, timeoutMs: req.timeoutMs },
      // The agent keeps the hook's own limit; this one only covers an agent that stopped answering.
      signal: AbortSignal.timeout(req.timeoutMs + 5000),
    });
    return { ...answer, body: answer.body === undefined ? undefined : Buffer.from(answer.body, "base64") };
  }

  async json<T = unknown>(method: string, path: string, opts: RequestOpts = {}): Promise<T> {
    const res = await this.send(method, path, opts);
    const chunks: Buffer[] = [];
    for await (const c of res) chunks.push(c as Buffer);
    return JSON.parse(Buffer.concat(chunks).toString() || "null") as T;
  }

  /** Sends a request; resolves with the response if it is 2xx, else rejects with an AgentError. */
  private send(method: string, path: string, opts: RequestOpts): Promise<IncomingMessage> {
    return new Promise((resolve, reject) => {
      const headers: Record<string, string> = { Authorization: `Bearer ${this.token}`, ...opts.headers };
      let payload: Buffer | Readable | undefined = opts.body;
      if (opts.json !== undefined) {
        payload = Buffer.from(JSON.stringify(opts.json));
        headers["Content-Type"] = "application/json";
      }
      if (Buffer.isBuffer(payload)) headers["Content-Length"] = String(payload.length);
      const req = request(
        { host: "127.0.0.1", port: this.port, method, path: `${path}${queryString(opts.query ?? {})}`, headers, agent: this.agent, signal: opts.signal },
        (res) => {
          if ((res.statusCode ?? 500) < 300) resolve(res);
          else errorFrom(res).then(reject, reject);
        },
      );
      req.on("error", reject);
      if (payload === undefined || Buffer.isBuffer(payload)) req.end(payload);
      else payload.on("error", (e) => req.destroy(e)).pipe(req);
    });
  }
}

function queryString(query: Query): string {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined) params.set(k, String(v));
  const s = params.toString();
  return s ? `?${s}` : "";
}

async function errorFrom(res: IncomingMessage): Promise<AgentError> {
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  const text = Buffer.concat(chunks).toString();
  try {
    const { error } = JSON.parse(text) as { error: { code: string; message: string } };
    return new AgentError(res.statusCode ?? 500, error.code, error.message);
  } catch {
    return new AgentError(res.statusCode ?? 500, "Internal", text.slice(0, 500) || `agent answered ${res.statusCode}`);
  }
}

function toAgentExec(req: ExecRequest): Record<string, unknown> {
  return {
    ...(typeof req.command === "string" ? { shell: req.command } : { argv: req.command }),
    env: req.env,
    cwd: req.cwd,
    user: req.user,
    ...(Buffer.isBuffer(req.stdin) ? { stdinBase64: req.stdin.toString("base64") } : { stdin: req.stdin }),
    timeoutMs: req.timeoutMs,
  };
}

function fromAgentEvent(raw: { type: string; data?: string } & Record<string, unknown>): ExecEvent {
  if (raw.type === "stdout" || raw.type === "stderr") return { type: raw.type, data: Buffer.from(raw.data ?? "", "base64") };
  return raw as unknown as ExecEvent;
}
