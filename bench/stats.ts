import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";

export interface Summary {
  n: number;
  p50: number;
  p95: number;
  min: number;
  max: number;
}

export function summarize(samples: number[]): Summary {
  const s = [...samples].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)] ?? NaN;
  const round = (v: number) => Math.round(v * 10) / 10;
  return { n: s.length, p50: round(at(0.5)), p95: round(at(0.95)), min: round(s[0] ?? NaN), max: round(s.at(-1) ?? NaN) };
}

/** A markdown table of latency summaries, one row per figure. */
export function summaryTable(unit: string, rows: [name: string, summary: Summary][]): string[] {
  return [
    `| figure (${unit}) | n | p50 | p95 | min | max |`,
    "|---|---|---|---|---|---|",
    ...rows.map(([name, s]) => `| ${name} | ${s.n} | ${s.p50} | ${s.p95} | ${s.min} | ${s.max} |`),
  ];
}

export async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t = performance.now();
  const v = await fn();
  return [v, performance.now() - t];
}

/** Writes `<name>.json` and `<name>.md` under bench/results/. */
export async function writeResults(name: string, results: unknown, markdown: string): Promise<void> {
  const dir = new URL("./results/", import.meta.url).pathname;
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, `${name}.json`), `${JSON.stringify(results, null, 2)}\n`);
  await writeFile(join(dir, `${name}.md`), markdown);
}

/** A guest command printing the µs one fork+exec of /bin/true takes inside the guest (mean of 50). */
export const GUEST_FORK_EXEC_US_COMMAND = "a=$(date +%s%N); for i in $(seq 50); do /bin/true; done; b=$(date +%s%N); echo $(( (b-a)/50000 ))";
