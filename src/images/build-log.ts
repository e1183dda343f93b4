import { EventEmitter } from "node:events";
import { createReadStream, createWriteStream, type WriteStream } from "node:fs";
import { PassThrough, type Readable } from "node:stream";

/** Past this, a build log keeps only its start and end in memory (the file has everything). */
const MEMORY_CAP_BYTES = 4 * 2 ** 20;

/**
 * One build's log: appended to `build.log` and kept in memory while the build
 * runs, so followers get everything so far and then each new chunk, until
 * the build ends.
 */
export class BuildLog extends EventEmitter {
  private readonly file: WriteStream;
  private chunks: string[] = [];
  private bytes = 0;
  ended = false;

  constructor(readonly path: string) {
    super();
    this.file = createWriteStream(path, { flags: "a", mode: 0o600 });
    this.file.on("error", () => undefined); // a log that cannot be written must not fail the build
  }

  write(text: string): void {
    if (this.ended || !text) return;
    this.file.write(text);
    if (this.bytes < MEMORY_CAP_BYTES) this.chunks.push(text);
    else if (this.chunks.at(-1) !== "\n[… see build.log …]\n") this.chunks.push("\n[… see build.log …]\n");
    this.bytes += text.length;
    this.emit("data", text);
  }

  line(text: string): void {
    this.write(`${text}\n`);
  }

  async end(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    this.emit("end");
    await new Promise<void>((resolve) => this.file.end(resolve));
  }

  /** Everything so far, then (follow) new output until the build ends. */
  stream(follow: boolean): Readable {
    const out = new PassThrough();
    out.write(this.chunks.join(""));
    if (!follow || this.ended) {
      out.end();
      return out;
    }
    const onData = (t: string) => out.write(t);
    const onEnd = () => {
      this.off("data", onData);
      out.end();
    };
    this.on("data", onData);
    this.once("end", onEnd);
    out.on("close", () => {
      this.off("data", onData);
      this.off("end", onEnd);
    });
    return out;
  }
}

/** A finished build's log, streamed from its file (it may be large: never read whole); empty if there is none. */
export async function readBuildLog(path: string): Promise<Readable> {
  const out = new PassThrough();
  const file = createReadStream(path).on("error", () => out.end());
  out.once("close", () => file.destroy()); // the reader went away
  file.pipe(out);
  return out;
}
