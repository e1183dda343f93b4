import { randomBytes } from "node:crypto";
import { Agent, request, type ClientRequest, type IncomingMessage } from "node:http";
import type { Socket } from "node:net";
import type { Readable } from "node:stream";
import { AgentError } from "../errors.ts";
import { sleep } from "../util/process.ts";

export { AgentError };

const MiB = 2 ** 20;

/**
 * What the agent (the guest: untrusted) can make the host hold or wait for.
 * An answer past a cap, or late, is an AgentError, never memory growth or a
 * hang. Timeouts are per call; streams (exec, logs, files, terminal) have an
 * idle limit instead of a total one where silence is not normal.
 */
export interface AgentLimits {
  /** A JSON answer (a directory listing of ~200k entries fits). */
  jsonBytes: number;
  /** An error answer: its message is all that is kept. */
  errorBytes: number;
  /** One line of exec's NDJSON stream (the agent sends ≤ 32 KiB of output per line, base64). */
  execLineBytes: number;
  /** Output kept per stream (stdout, stderr) by `exec`, which collects; the rest is drained and reported as truncated. */
  execOutputBytes: number;
  /** Until the response headers arrive, for every request. */
  headersTimeoutMs: number;
  /** A whole JSON call, unless the call sets its own. */
  callTimeoutMs: number;
  /** A transfer (file down- or upload) with no byte either way for this long is cut. */
  idleTimeoutMs: number;
  /** Extra time an exec may take past its own timeout (the agent kills it at the timeout and drains its output). */
  execGraceMs: number;
}

export const AGENT_LIMITS: AgentLimits = {
  jsonBytes: 32 * MiB,
  errorBytes: 64 * 1024,
  execLineBytes: 1 * MiB,
  execOutputBytes: 4 * MiB,
  headersTimeoutMs: 30_000,
  callTimeoutMs: 30_000,
  idleTimeoutMs: 60_000,
  execGraceMs: 30_000,
};

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
  /** Streams that produced more than AgentLimits.execOutputBytes: only their first bytes are in stdout/stderr. */
  truncated: { stdout: boolean; stderr: boolean };
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
  /** No byte either way for this long cuts the request; 0: none (streams where silence is normal). Default AgentLimits.idleTimeoutMs. */
  idleTimeoutMs?: number;
}

interface JsonOpts extends RequestOpts {
  /** The whole call, answer read; 0: none (an upload, bounded by its idle timeout). Default AgentLimits.callTimeoutMs. */
  timeoutMs?: number;
}

/**
 * HTTP client for one VM's cocoon-agent, reached through the VM's forwarded
 * loopback port. Keeps connections alive: a VM answers many small requests.
 * The agent runs in the guest, so every answer is bounded (AgentLimits).
 */
export class AgentClient {
  // keepAliveMsecs is the TCP keep-alive idle time of these sockets: Node's
  // default (1 s) sends every idle connection a probe each second, which
  // wakes the guest and its QEMU forever; the peer is a local VM, so probe
  // only after ten minutes of silence.
  private readonly agent = new Agent({ keepAlive: true, keepAliveMsecs: 600_000, maxSockets: 64 });
  private readonly limits: AgentLimits;

  constructor(
    readonly port: number,
    private token: string,
    limits: Partial<AgentLimits> = {},
  ) {
    this.limits = { ...AGENT_LIMITS, ...limits };
  }

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
        await this.json("GET", "/health", { signal, timeoutMs: 1000 });
        return;
      } catch (err) {
        if (signal?.aborted) throw err;
        if (Date.now() > deadline) throw new Error(`agent not ready within ${timeoutMs} ms: ${(err as Error).message}`, { cause: err });
        await sleep(50);
      }
    }
  }

  /**
   * Makes a restored guest unique and current: fresh kernel entropy, wall
   * clock stepped to now, its hostname, and a new secret (the old one, shared
   * with every clone of the snapshot, stops working). A resume
   * (`sameMachine`) keeps its machine-id; a launch or fork child gets a new one.
   */
  async restore(opts: { newToken: string; hostname: string; sameMachine?: boolean }): Promise<void> {
    const oldToken = this.token;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.json("POST", "/restore", {
          json: { token: opts.newToken, entropy: randomBytes(64).toString("base64"), unixTimeNs: Date.now() * 1e6, hostname: opts.hostname, keepMachineId: opts.sameMachine === true },
        });
        this.token = opts.newToken;
        return;
      } catch (err) {
        // The first connection into a just-restored guest is occasionally reset
        // by the forwarder (passt) before an answer. The request may have
        // re-keyed the agent even so: then the new secret already works.
        if (((err as Error).cause as NodeJS.ErrnoException | undefined)?.code !== "ECONNRESET" || attempt >= 3) throw err;
        this.token = opts.newToken;
        if (await this.appStatus().then(() => true, () => false)) return;
        this.token = oldToken;
        await sleep(50 * attempt);
      }
    }
  }

  /** Flushes the guest's page cache to its disk (before a snapshot); a large cache under TCG takes a while. */
  sync(): Promise<unknown> {
    return this.json("POST", "/sync", { timeoutMs: 120_000 });
  }

  /** Waits for the root device to reach `sizeBytes` (the host grew it), then grows the filesystem to fill it. */
  growDisk(sizeBytes: number): Promise<{ deviceBytes: number; filesystemBytes: number; grown: boolean }> {
    return this.json("POST", "/disk/grow", { json: { sizeBytes } });
  }

  /** Mounts each disk with virtio serial `serial` at `path` (re-probing it first: vmm/volumes.ts). */
  mountVolumes(volumes: { serial: string; path: string; readOnly: boolean }[]): Promise<unknown> {
    return this.json("POST", "/volumes/mount", { json: { volumes }, timeoutMs: 60_000 });
  }

  setEnv(env: Record<string, string>): Promise<unknown> {
    return this.json("PUT", "/env", { json: env });
  }

  stats(signal?: AbortSignal): Promise<Record<string, number>> {
    return this.json("GET", "/stats", { signal });
  }

  /**
   * Runs a command and yields its output as it arrives. The caller pulls:
   * while it does not, the agent's stream (and the command's pipes) wait.
   * Ends at the command's own timeout plus AgentLimits.execGraceMs at the latest.
   */
  async *execStream(req: ExecRequest, signal?: AbortSignal): AsyncGenerator<ExecEvent> {
    const deadline = req.timeoutMs ? AbortSignal.timeout(req.timeoutMs + this.limits.execGraceMs) : undefined;
    const signals = [signal, deadline].filter((s): s is AbortSignal => s !== undefined);
    const res = await this.send("POST", "/exec", { json: toAgentExec(req), signal: signals.length ? AbortSignal.any(signals) : undefined, idleTimeoutMs: 0 });
    let buffered: Buffer = Buffer.alloc(0);
    try {
      for await (const chunk of res) {
        buffered = buffered.length ? Buffer.concat([buffered, chunk as Buffer]) : (chunk as Buffer);
        let nl: number;
        while ((nl = buffered.indexOf(10)) >= 0) {
          const line = buffered.subarray(0, nl);
          buffered = buffered.subarray(nl + 1);
          if (line.length) yield parseExecLine(line);
        }
        if (buffered.length > this.limits.execLineBytes) {
          throw new AgentError(502, "BadResponse", `an exec output line from the agent exceeds ${this.limits.execLineBytes} bytes`);
        }
      }
    } catch (err) {
      if (deadline?.aborted && !signal?.aborted) {
        throw new AgentError(504, "Timeout", `the agent did not end the command within its timeout + ${this.limits.execGraceMs / 1000} s`);
      }
      throw lostAgent(err as Error, "while the command ran");
    } finally {
      res.destroy();
    }
  }

  /**
   * Runs a command to completion, keeping at most AgentLimits.execOutputBytes
   * of each stream, and of that only the chunks `keep` takes (the rest is
   * read and dropped, so the command is not blocked on a full pipe, and
   * `truncated` says so).
   */
  async exec(req: ExecRequest, signal?: AbortSignal, keep?: (chunk: Buffer) => boolean): Promise<ExecResult> {
    const cap = this.limits.execOutputBytes;
    const kept = { stdout: [] as Buffer[], stderr: [] as Buffer[] };
    const size = { stdout: 0, stderr: 0 };
    const truncated = { stdout: false, stderr: false };
    for await (const ev of this.execStream(req, signal)) {
      if (ev.type === "stdout" || ev.type === "stderr") {
        if (truncated[ev.type]) continue;
        const part = ev.data.subarray(0, cap - size[ev.type]);
        if (keep && !keep(part)) {
          truncated[ev.type] = true;
          continue;
        }
        kept[ev.type].push(part);
        size[ev.type] += part.length;
        if (part.length < ev.data.length) truncated[ev.type] = true;
      } else if (ev.type === "exit") {
        return {
          exitCode: ev.exitCode,
          signal: ev.signal,
          timedOut: ev.timedOut,
          durationMs: ev.durationMs,
          stdout: Buffer.concat(kept.stdout).toString(),
          stderr: Buffer.concat(kept.stderr).toString(),
          truncated,
        };
      }
    }
    throw new AgentError(502, "AgentDisconnected", "the agent closed the exec stream before the command exited");
  }

  /** Streams a file out of the guest. */
  async readFile(path: string, signal?: AbortSignal): Promise<IncomingMessage> {
    const res = await this.send("GET", "/files", { query: { path }, signal });
    if (!String(res.headers["content-type"]).startsWith("application/octet-stream")) {
      res.destroy();
      throw new AgentError(409, "Conflict", `${path} is a directory`);
    }
    return res;
  }

  /** Streams `body` into a file in the guest (parents created, replaced atomically). */
  writeFile(path: string, body: Buffer | Readable, opts: { mode?: string; user?: string } = {}): Promise<{ path: string; size: number }> {
    return this.json("PUT", "/files", { query: { path, mode: opts.mode, user: opts.user }, body, timeoutMs: 0 });
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

  /** Removes a file or (recursive) a tree; a large tree under TCG takes a while. */
  remove(path: string, recursive = false): Promise<unknown> {
    return this.json("DELETE", "/files", { query: { path, recursive }, timeoutMs: 120_000 });
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
    return this.send("GET", "/logs", { query: { follow }, signal, idleTimeoutMs: follow ? 0 : undefined });
  }

  /** Opens an interactive PTY; frames are described in agent/PROTOCOL.md. */
  pty(opts: { cmd?: string; cols?: number; rows?: number; user?: string; cwd?: string }): Promise<Socket> {
    return this.upgrade(`/pty${queryString(opts)}`, "cocoon-pty");
  }

  /** A raw TCP connection to `port` on the guest's loopback, dialled by the agent (agent/PROTOCOL.md, Tunnel). */
  tunnel(port: number): Promise<Socket> {
    return this.upgrade(`/tunnel${queryString({ port })}`, "cocoon-tunnel");
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
      timeoutMs: req.timeoutMs + 5000,
    });
    return { ...answer, body: answer.body === undefined ? undefined : Buffer.from(answer.body, "base64") };
  }

  async json<T = unknown>(method: string, path: string, opts: JsonOpts = {}): Promise<T> {
    const timeoutMs = opts.timeoutMs ?? this.limits.callTimeoutMs;
    const deadline = timeoutMs > 0 ? AbortSignal.timeout(timeoutMs) : undefined;
    const signals = [opts.signal, deadline].filter((s): s is AbortSignal => s !== undefined);
    try {
      const res = await this.send(method, path, { ...opts, signal: signals.length ? AbortSignal.any(signals) : undefined });
      const text = (await readCapped(res, this.limits.jsonBytes, `the agent's answer to ${method} ${path}`)).toString();
      try {
        return JSON.parse(text || "null") as T;
      } catch {
        throw new AgentError(502, "BadResponse", `the agent's answer to ${method} ${path} is not JSON`);
      }
    } catch (err) {
      if (deadline?.aborted && !opts.signal?.aborted) throw new AgentError(504, "Timeout", `the agent did not answer ${method} ${path} within ${timeoutMs} ms`);
      throw err;
    }
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
      const idleTimeoutMs = opts.idleTimeoutMs ?? this.limits.idleTimeoutMs;
      const req = request(
        {
          host: "127.0.0.1",
          port: this.port,
          method,
          path: `${path}${queryString(opts.query ?? {})}`,
          headers,
          agent: this.agent,
          signal: opts.signal,
          ...(idleTimeoutMs > 0 ? { timeout: idleTimeoutMs } : {}),
        },
        (res) => {
          if ((res.statusCode ?? 500) < 300) resolve(res);
          else errorFrom(res, this.limits.errorBytes).then(reject, reject);
        },
      );
      req.on("timeout", () => req.destroy(new AgentError(504, "Timeout", `the agent sent nothing for ${idleTimeoutMs} ms (${method} ${path})`)));
      this.bound(req, method, path, reject);
      if (payload === undefined || Buffer.isBuffer(payload)) req.end(payload);
      else payload.on("error", (e) => req.destroy(e)).pipe(req);
    });
  }

  /** An HTTP upgrade to one of the agent's raw protocols; resolves with the socket after `101`. */
  private upgrade(path: string, protocol: string): Promise<Socket> {
    return new Promise((resolve, reject) => {
      const req = request({
        host: "127.0.0.1",
        port: this.port,
        path,
        headers: { Authorization: `Bearer ${this.token}`, Connection: "Upgrade", Upgrade: protocol },
      });
      req.on("upgrade", (_res, socket, head) => {
        socket.setTimeout(0); // a terminal or a tunnel may be silent for hours
        if (head.length) socket.unshift(head);
        resolve(socket);
      });
      req.on("response", (res) => errorFrom(res, this.limits.errorBytes).then(reject, reject));
      this.bound(req, "GET", path, reject);
      req.end();
    });
  }

  /** Rejects (and ends) `req` if no response headers arrive in time; any request error rejects. */
  private bound(req: ClientRequest, method: string, path: string, reject: (err: Error) => void): void {
    const timer = setTimeout(
      () => req.destroy(new AgentError(504, "Timeout", `the agent did not answer ${method} ${path.split("?")[0]} within ${this.limits.headersTimeoutMs} ms`)),
      this.limits.headersTimeoutMs,
    );
    const done = () => clearTimeout(timer);
    req.once("response", done);
    req.once("upgrade", done);
    req.once("close", done);
    req.on("error", (err) => {
      done();
      reject(lostAgent(err, `(${method} ${path.split("?")[0]})`));
    });
  }
}

/**
 * A broken connection to the agent (its VM ended, or its guest reset the
 * socket) as the AgentError it is; the caller's own abort and the client's
 * typed errors pass through as they are.
 */
function lostAgent(err: Error, when: string): Error {
  if (err instanceof AgentError || err.name === "AbortError") return err;
  const code = (err as NodeJS.ErrnoException).code;
  return new AgentError(502, "AgentDisconnected", `the connection to the agent broke ${when}: ${code ?? err.message}`, { cause: err });
}

function queryString(query: Query): string {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined) params.set(k, String(v));
  const s = params.toString();
  return s ? `?${s}` : "";
}

/** The whole body of `res`, or an AgentError (and the response destroyed) once it passes `maxBytes`. */
async function readCapped(res: IncomingMessage, maxBytes: number, what: string): Promise<Buffer> {
  const declared = Number(res.headers["content-length"] ?? 0);
  const tooLarge = () => new AgentError(502, "BadResponse", `${what} exceeds ${maxBytes} bytes`);
  if (declared > maxBytes) {
    res.destroy();
    throw tooLarge();
  }
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of res) {
    size += (c as Buffer).length;
    if (size > maxBytes) {
      res.destroy();
      throw tooLarge();
    }
    chunks.push(c as Buffer);
  }
  return Buffer.concat(chunks);
}

/** The agent's error answer as an AgentError; only its first `maxBytes` are read. */
async function errorFrom(res: IncomingMessage, maxBytes: number): Promise<AgentError> {
  const status = res.statusCode ?? 500;
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of res) {
    chunks.push((c as Buffer).subarray(0, Math.max(0, maxBytes - size)));
    size += (c as Buffer).length;
    if (size >= maxBytes) {
      res.destroy();
      break;
    }
  }
  const text = Buffer.concat(chunks).toString();
  try {
    const { error } = JSON.parse(text) as { error?: { code?: unknown; message?: unknown } };
    if (typeof error?.code === "string" && typeof error.message === "string") return new AgentError(status, error.code.slice(0, 64), error.message.slice(0, 2000));
  } catch {
    // not the agent's JSON error: described below
  }
  return new AgentError(status, "Internal", text.slice(0, 500) || `agent answered ${status}`);
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

/** One NDJSON line of exec's stream as an event; anything else from the guest is a BadResponse. */
function parseExecLine(line: Buffer): ExecEvent {
  let raw: { type?: unknown; data?: unknown; pid?: unknown; exitCode?: unknown; signal?: unknown; timedOut?: unknown; durationMs?: unknown };
  try {
    raw = JSON.parse(line.toString()) as typeof raw;
  } catch {
    throw new AgentError(502, "BadResponse", "the agent's exec stream has a line that is not JSON");
  }
  const num = (v: unknown) => (typeof v === "number" && Number.isFinite(v) ? v : 0);
  switch (raw?.type) {
    case "started":
      return { type: "started", pid: num(raw.pid) };
    case "stdout":
    case "stderr":
      return { type: raw.type, data: Buffer.from(typeof raw.data === "string" ? raw.data : "", "base64") };
    case "exit":
      return {
        type: "exit",
        exitCode: num(raw.exitCode),
        signal: typeof raw.signal === "string" ? raw.signal : "",
        timedOut: raw.timedOut === true,
        durationMs: num(raw.durationMs),
      };
    default:
      throw new AgentError(502, "BadResponse", "the agent's exec stream has a line of an unknown type");
  }
}
