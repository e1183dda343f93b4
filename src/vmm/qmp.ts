import { EventEmitter } from "node:events";
import { createConnection, type Socket } from "node:net";

/** Thrown when QEMU answers a QMP command with an error. */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly qmpClass: string,
    desc: string,
  ) {
    super(`QMP ${command}: ${desc}`);
    this.name = "QmpError";
  }
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/**
 * A client for QEMU's machine protocol over its unix socket: one JSON object
 * per line, commands answered in order. Emits `event` for asynchronous QMP
 * events and `close` once when the socket ends (QEMU exited or closed it).
 */
export class QmpClient extends EventEmitter {
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closed = false;

  private constructor(private readonly socket: Socket) {
    super();
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("error", () => socket.destroy());
    socket.on("close", () => this.onClose());
  }

  /**
   * Connects, reads the greeting and leaves capability negotiation mode,
   * within `timeoutMs` (QEMU may not have accepted yet) or until `signal` aborts.
   */
  static async connect(path: string, opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<QmpClient> {
    const limit = AbortSignal.timeout(opts.timeoutMs ?? 5000);
    const signal = opts.signal ? AbortSignal.any([opts.signal, limit]) : limit;
    const socket = createConnection(path);
    const client = new QmpClient(socket);
    const abort = () => socket.destroy(new Error(`QMP connect to ${path} ${limit.aborted ? "timed out" : "aborted"}`));
    signal.addEventListener("abort", abort, { once: true });
    try {
      signal.throwIfAborted();
      await client.execute("qmp_capabilities");
      return client;
    } catch (err) {
      socket.destroy();
      throw limit.aborted ? new Error(`QMP connect to ${path} timed out`) : err;
    } finally {
      signal.removeEventListener("abort", abort);
    }
  }

  get isClosed(): boolean {
    return this.closed;
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closed) return Promise.reject(new Error(`QMP ${command}: connection closed`));
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${JSON.stringify({ execute: command, arguments: args, id })}\n`);
    });
  }

  close(): void {
    this.socket.destroy();
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf("\n")) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onMessage(JSON.parse(line));
    }
  }

  private onMessage(msg: { id?: number; return?: unknown; error?: { class: string; desc: string }; event?: string }): void {
    if (msg.event) {
      this.emit("event", msg);
      return;
    }
    if (msg.id === undefined) return; // the greeting
    const p = this.pending.get(msg.id);
    if (!p) return;
    this.pending.delete(msg.id);
    if (msg.error) p.reject(new QmpError(p.command, msg.error.class, msg.error.desc));
    else p.resolve(msg.return);
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.pending.values()) p.reject(new Error(`QMP ${p.command}: QEMU closed the connection`));
    this.pending.clear();
    this.emit("close");
  }
}
