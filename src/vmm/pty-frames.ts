import { EventEmitter } from "node:events";
import type { Socket } from "node:net";

/**
 * The agent's terminal framing (agent/PROTOCOL.md): 1 byte type, 4 bytes
 * big-endian length, payload. Data flows both ways; resize goes to the
 * agent; exit (an int32 code) comes from it, last.
 */
export const PTY_FRAME = { data: 0, resize: 1, exit: 2 } as const;

/** The largest frame accepted from the agent (it sends at most 32 KiB of output per frame). */
export const MAX_PTY_FRAME_BYTES = 1024 * 1024;

/** A frame from the agent that breaks the protocol: too long, or an exit frame without its code. */
export class PtyFrameError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "PtyFrameError";
  }
}

export function encodePtyFrame(type: number, payload: Buffer): Buffer {
  const head = Buffer.alloc(5);
  head[0] = type;
  head.writeUInt32BE(payload.length, 1);
  return Buffer.concat([head, payload]);
}

export function resizeFrame(cols: number, rows: number): Buffer {
  const p = Buffer.alloc(4);
  p.writeUInt16BE(cols, 0);
  p.writeUInt16BE(rows, 2);
  return encodePtyFrame(PTY_FRAME.resize, p);
}

/** The exit code an exit frame carries; PtyFrameError if it is shorter than its int32. */
export function exitCodeOf(payload: Buffer): number {
  if (payload.length < 4) throw new PtyFrameError(`an exit frame needs a 4-byte code, got ${payload.length} bytes`);
  return payload.readInt32BE(0);
}

/**
 * Splits a byte stream into frames, however the chunks fall. Throws
 * PtyFrameError for a header announcing more than `maxFrameBytes`, before
 * anything of it is buffered; callers in a `data` listener must catch it.
 */
export class PtyFrameDecoder {
  private buf: Buffer = Buffer.alloc(0);

  constructor(private readonly maxFrameBytes = MAX_PTY_FRAME_BYTES) {}

  push(chunk: Buffer): { type: number; payload: Buffer }[] {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    const frames: { type: number; payload: Buffer }[] = [];
    while (this.buf.length >= 5) {
      const len = this.buf.readUInt32BE(1);
      if (len > this.maxFrameBytes) throw new PtyFrameError(`a terminal frame of ${len} bytes exceeds ${this.maxFrameBytes}`);
      if (this.buf.length < 5 + len) break;
      frames.push({ type: this.buf[0]!, payload: this.buf.subarray(5, 5 + len) });
      this.buf = this.buf.subarray(5 + len);
    }
    return frames;
  }
}

/**
 * A terminal session over the agent's PTY socket, without the framing:
 * `write` keystrokes, `resize` (each calls `onInput`), and events `data` (Buffer of output),
 * `exit` (the shell's code, then the session ends) and `end` (once, with an
 * Error when the agent broke the protocol or the connection failed).
 */
export class PtySession extends EventEmitter {
  private readonly decoder = new PtyFrameDecoder();
  private ended = false;

  constructor(
    private readonly socket: Socket,
    private readonly opts: { onInput?: () => void } = {},
  ) {
    super();
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("error", (err) => this.end(err));
    socket.on("close", () => this.end());
  }

  write(data: Buffer): void {
    if (this.ended) return;
    this.opts.onInput?.();
    this.socket.write(encodePtyFrame(PTY_FRAME.data, data));
  }

  resize(cols: number, rows: number): void {
    if (this.ended) return;
    this.opts.onInput?.();
    this.socket.write(resizeFrame(cols, rows));
  }

  /** Stops reading output (back-pressure on the agent, then the shell); `resume` reads on. */
  pause(): void {
    this.socket.pause();
  }

  resume(): void {
    this.socket.resume();
  }

  /** Ends the session (the agent hangs up the shell). Idempotent. */
  close(): void {
    this.end();
  }

  private onData(chunk: Buffer): void {
    try {
      for (const frame of this.decoder.push(chunk)) {
        if (frame.type === PTY_FRAME.data) this.emit("data", frame.payload);
        else if (frame.type === PTY_FRAME.exit) {
          this.emit("exit", exitCodeOf(frame.payload));
          this.end();
        }
      }
    } catch (err) {
      this.end(err as Error);
    }
  }

  private end(err?: Error): void {
    if (this.ended) return;
    this.ended = true;
    this.socket.destroy();
    this.emit("end", err);
  }
}
