import type { Writable } from "node:stream";

/**
 * Resolves once `out` has room again ('drain') or is gone ('close', 'error'):
 * a writer that waits here after `write` returned false keeps at most one
 * high-water mark buffered, however slow the reader.
 */
export function drained(out: Writable | NodeJS.WritableStream): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      out.off("drain", done);
      out.off("close", done);
      out.off("error", done);
      resolve();
    };
    out.once("drain", done);
    out.once("close", done);
    out.once("error", done);
  });
}
