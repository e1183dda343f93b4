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

/** The longest QMP line accepted (QEMU's largest answers, e.g. query-qmp-schema, are a few MiB). */
export const MAX_QMP_LINE_BYTES = 16 * 2 ** 20;

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/**
 * A client for QEMU's machine protocol over its unix socket: one JSON object
 * per line, commands answered in order. Emits `event` for asynchronous QMP
 * events and `close` once when the socket ends (QEMU exited or closed it),
 * with an Error when the peer broke the protocol (a line that is not JSON or
 * exceeds MAX_QMP_LINE_BYTES): that connection is then closed, since nothing
 * it says can be trusted; nothing is thrown in a listener.
 */
export class QmpClient extends EventEmitter {
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closed = false;
  private protocolError: Error | undefined;

  private constructor(
    private readonly socket: Socket,
    private readonly maxLineBytes: number,
  ) {
    super();
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("error", () => socket.destroy());
    socket.on("close", () => this.onClose());
  }

  /**
   * Connects, reads the greeting and leaves capability negotiation mode,
   * within `timeoutMs` (QEMU may not have accepted yet) or until `signal` aborts.
   * A line from QEMU longer than `maxLineBytes` closes the connection.
   */
  static async connect(path: string, opts: { timeoutMs?: number; signal?: AbortSignal; maxLineBytes?: number } = {}): Promise<QmpClient> {
    const limit = AbortSignal.timeout(opts.timeoutMs ?? 5000);
    const signal = opts.signal ? AbortSignal.any([opts.signal, limit]) : limit;
    const socket = createConnection(path);
    const client = new QmpClient(socket, opts.maxLineBytes ?? MAX_QMP_LINE_BYTES);
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
    if (this.closed || this.protocolError) return;
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf("\n")) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (!line) continue;
      let msg: unknown;
      try {
        msg = JSON.parse(line);
      } catch {
        return this.fail(`QMP peer sent a line that is not JSON: ${JSON.stringify(line.slice(0, 80))}`);
      }
      if (typeof msg !== "object" || msg === null) return this.fail("QMP peer sent a line that is not a JSON object");
      this.onMessage(msg as Parameters<QmpClient["onMessage"]>[0]);
    }
    // Characters, not bytes: a bound of the same order without re-encoding every chunk.
    if (this.buffer.length > this.maxLineBytes) this.fail(`QMP peer sent a line longer than ${this.maxLineBytes} bytes`);
  }

  /** Ends a connection whose peer broke the protocol; pending commands fail with the reason. */
  private fail(reason: string): void {
    this.protocolError = new Error(reason);
    this.buffer = "";
    this.socket.destroy();
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
    const cause = this.protocolError?.message ?? "QEMU closed the connection";
    for (const p of this.pending.values()) p.reject(new Error(`QMP ${p.command}: ${cause}`));
    this.pending.clear();
    this.emit("close", this.protocolError);
  }
}
