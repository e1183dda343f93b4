/**
 * What buffered exec answers may hold in the server's memory at once. A
 * buffered exec keeps its output until the answer is sent, and an answer is
 * bigger than the output: the kept bytes, the string decoded from them, and
 * the JSON text and its bytes on the socket, where a NUL is six bytes
 * (`\u0000`). Each kept chunk is charged what it can grow to and the charge
 * is held until its answer is sent (or the client is gone), so many VMs
 * flooding at once, or slow clients reading their answers, cannot add up
 * past the budget: past it, output is dropped and the answer says
 * `truncated`, as past the per-exec cap. Streamed exec (NDJSON) needs none:
 * it is paced by the client.
 */
export class OutputBudget {
  private usedBytes = 0;

  constructor(readonly capacityBytes: number) {}

  /** Bytes charged now, by all answers not yet sent. */
  get used(): number {
    return this.usedBytes;
  }

  /**
   * One answer's share: `keep` takes a chunk whole or refuses it (once one is
   * refused, later ones are too, so what is kept is a prefix of the output);
   * `release` gives the share back, once, when the answer has been sent.
   */
  hold(): { keep(chunk: Buffer): boolean; release(): void } {
    let heldBytes = 0;
    let full = false;
    let released = false;
    return {
      keep: (chunk) => {
        if (full || released) return false;
        const charge = answerBytes(chunk);
        if (this.usedBytes + charge > this.capacityBytes) {
          full = true;
          return false;
        }
        this.usedBytes += charge;
        heldBytes += charge;
        return true;
      },
      release: () => {
        if (released) return;
        released = true;
        this.usedBytes -= heldBytes;
        heldBytes = 0;
      },
    };
  }
}

/**
 * At most what `chunk` takes in memory on its way to the client: the Buffer
 * kept, the string decoded from it (two bytes a character at worst), and its
 * JSON escaping twice (the string, then its UTF-8 bytes): a control byte is
 * `\u00XX` (6), `"` and `\` are 2, a byte of a broken UTF-8 sequence becomes
 * U+FFFD (3).
 */
export function answerBytes(chunk: Buffer): number {
  let json = 0;
  for (const byte of chunk) {
    if (byte < 0x20) json += byte === 0x08 || byte === 0x09 || byte === 0x0a || byte === 0x0c || byte === 0x0d ? 2 : 6;
    else if (byte === 0x22 || byte === 0x5c) json += 2;
    else if (byte >= 0x80) json += 3;
    else json += 1;
  }
  return chunk.length * 3 + json * 2;
}
