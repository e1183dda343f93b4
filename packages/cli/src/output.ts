/** Human output (tables, key/value lists, progress on stderr) and --json. */

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

/** Columns padded to their widest cell, two spaces apart; the last column is not padded. */
export function printTable(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i] ?? 0)))
      .join("  ")
      .trimEnd();
  process.stdout.write(`${[line(header), ...rows.map(line)].join("\n")}\n`);
}

/** `key: value` lines with aligned values; undefined values are left out. */
export function printFields(fields: [string, string | number | boolean | undefined][]): void {
  const shown = fields.filter((f): f is [string, string | number | boolean] => f[1] !== undefined && f[1] !== "");
  const width = Math.max(...shown.map(([k]) => k.length));
  process.stdout.write(`${shown.map(([k, v]) => `${`${k}:`.padEnd(width + 2)}${v}`).join("\n")}\n`);
}

/** "12s", "5m", "3h", "2d" since an ISO time. */
export function age(iso: string | undefined, now = Date.now()): string {
  if (!iso) return "";
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

export function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

const FRAMES = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];

/**
 * Runs `fn` while a spinner with the elapsed time turns on stderr (only when
 * stderr is a terminal; nothing is drawn into pipes and logs). The line is
 * cleared when `fn` settles. Returns the result and the elapsed milliseconds.
 */
export async function withProgress<T>(label: string, fn: () => Promise<T>): Promise<{ result: T; elapsedMs: number }> {
  const started = performance.now();
  const tty = process.stderr.isTTY === true;
  let frame = 0;
  const draw = () => process.stderr.write(`\r\x1b[2K${FRAMES[frame++ % FRAMES.length]} ${label} ${seconds(performance.now() - started)}`);
  const timer = tty ? setInterval(draw, 100) : undefined;
  if (tty) draw();
  try {
    const result = await fn();
    return { result, elapsedMs: performance.now() - started };
  } finally {
    clearInterval(timer);
    if (tty) process.stderr.write("\r\x1b[2K");
  }
}
