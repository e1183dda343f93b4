/** Keeping tool results small enough for a model's context. */

/** Command output the run tools return, stdout and stderr together; the rest is cut with a note. */
export const OUTPUT_BUDGET_BYTES = 16 * 1024;
/** How much of a file one read_file call returns. */
export const READ_CHUNK_BYTES = 16 * 1024;
/** Directory entries one list_files call returns. */
export const MAX_LIST_ENTRIES = 500;

const HOW_TO_SEE_ALL = "to see all of it, redirect the output to a file in the sandbox (cmd > /tmp/out.txt 2>&1) and page through it with read_file and its offset";

/**
 * `text` whole if it fits in `limitBytes` of UTF-8, else its head and tail
 * (half each, cut at character boundaries) around a note saying how much was
 * cut and how to get the rest. The tail is kept because errors come last.
 */
export function clip(text: string, limitBytes: number, what: string): string {
  const bytes = Buffer.from(text, "utf8");
  if (bytes.length <= limitBytes) return text;
  const half = Math.floor(limitBytes / 2);
  const head = bytes.subarray(0, charBoundary(bytes, half));
  const tail = bytes.subarray(charBoundary(bytes, bytes.length - half));
  const cut = bytes.length - head.length - tail.length;
  return `${head.toString("utf8")}\n[… ${cut} of ${bytes.length} bytes of ${what} cut here; ${HOW_TO_SEE_ALL} …]\n${tail.toString("utf8")}`;
}

/** The largest index <= `at` that starts a UTF-8 character (not a continuation byte 10xxxxxx). */
function charBoundary(bytes: Buffer, at: number): number {
  let i = Math.max(0, Math.min(at, bytes.length));
  while (i > 0 && i < bytes.length && ((bytes[i] ?? 0) & 0xc0) === 0x80) i--;
  return i;
}

/** The length of `bytes` without a UTF-8 character cut off at its end. */
export function wholeCharsLength(bytes: Buffer): number {
  const lead = charBoundary(bytes, bytes.length - 1);
  const b = bytes[lead] ?? 0;
  const width = b < 0x80 ? 1 : b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1;
  return lead + width > bytes.length ? lead : bytes.length;
}

/**
 * Splits the budget between stdout and stderr: each gets half, and what one
 * does not use goes to the other.
 */
export function outputBudgets(stdout: string, stderr: string, budget = OUTPUT_BUDGET_BYTES): { stdout: number; stderr: number } {
  const half = Math.floor(budget / 2);
  const errBytes = Buffer.byteLength(stderr, "utf8");
  const outBudget = errBytes < half ? budget - errBytes : half;
  const errBudget = budget - Math.min(Buffer.byteLength(stdout, "utf8"), outBudget);
  return { stdout: outBudget, stderr: errBudget };
}
