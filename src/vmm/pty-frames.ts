/**
 * The agent's terminal framing (agent/PROTOCOL.md): 1 byte type, 4 bytes
 * big-endian length, payload. Data flows both ways; resize goes to the
 * agent; exit (an int32 code) comes from it, last.
 */
export const PTY_FRAME = { data: 0, resize: 1, exit: 2 } as const;

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

/** Splits a byte stream into frames, however the chunks fall. */
export class PtyFrameDecoder {
  private buf = Buffer.alloc(0);

  push(chunk: Buffer): { type: number; payload: Buffer }[] {
    this.buf = Buffer.concat([this.buf, chunk]);
    const frames: { type: number; payload: Buffer }[] = [];
    while (this.buf.length >= 5 && this.buf.length >= 5 + this.buf.readUInt32BE(1)) {
      const len = this.buf.readUInt32BE(1);
      frames.push({ type: this.buf[0]!, payload: this.buf.subarray(5, 5 + len) });
      this.buf = this.buf.subarray(5 + len);
    }
    return frames;
  }
}
