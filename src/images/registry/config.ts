import type { Healthcheck, ImageConfig } from "../dockerfile.ts";

/**
 * An OCI (or Docker) image config's runtime part as Cocoon's ImageConfig:
 * Env, WorkingDir, User, Entrypoint, Cmd, ExposedPorts (the lowest TCP port
 * is the app's), Healthcheck (Docker's extension), StopSignal, Volumes, Shell,
 * Labels. The blob comes from a registry: every field is type-checked and
 * bounded, and anything malformed is an Error naming the field.
 */
export function configFromOci(blob: unknown): ImageConfig {
  const root = object(blob, "config");
  const c = root.config === undefined || root.config === null ? {} : object(root.config, "config.config");
  const env: Record<string, string> = {};
  for (const kv of strings(c.Env, "Env", 4096)) {
    const eq = kv.indexOf("=");
    if (eq <= 0) throw new Error(`image config: Env entry "${kv.slice(0, 60)}" is not NAME=value`);
    env[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  const entrypoint = strings(c.Entrypoint, "Entrypoint", 4096);
  const cmd = strings(c.Cmd, "Cmd", 4096);
  const ports = Object.keys(c.ExposedPorts === undefined || c.ExposedPorts === null ? {} : object(c.ExposedPorts, "ExposedPorts"))
    .filter((p) => !p.endsWith("/udp") && !p.endsWith("/sctp"))
    .map((p) => Number(p.replace(/\/tcp$/, "")))
    .filter((p) => Number.isInteger(p) && p >= 1 && p <= 65535)
    .sort((a, b) => a - b);
  const labels: Record<string, string> = {};
  const rawLabels = c.Labels === undefined || c.Labels === null ? {} : object(c.Labels, "Labels");
  for (const [k, v] of Object.entries(rawLabels).slice(0, 1024)) if (typeof v === "string") labels[k] = v;
  const user = str(c.User, "User") ?? "";
  const workdir = str(c.WorkingDir, "WorkingDir") ?? "";
  const stopSignal = str(c.StopSignal, "StopSignal");
  const shell = strings(c.Shell, "Shell", 64);
  const volumes = Object.keys(c.Volumes === undefined || c.Volumes === null ? {} : object(c.Volumes, "Volumes")).slice(0, 256);
  return {
    env,
    workdir: workdir.startsWith("/") ? workdir : `/${workdir}`,
    user: user.split(":")[0] || "root",
    argv: [...entrypoint, ...cmd],
    entrypoint,
    cmd,
    appPort: ports[0],
    healthcheck: healthcheckOf(c.Healthcheck),
    labels,
    ...(stopSignal ? { stopSignal } : {}),
    ...(volumes.length ? { volumes } : {}),
    ...(shell.length ? { shell } : {}),
  };
}

/** Docker's `Healthcheck: {Test, Interval, Timeout, StartPeriod, Retries}` (durations in ns). */
function healthcheckOf(raw: unknown): Healthcheck | undefined {
  if (raw === undefined || raw === null) return undefined;
  const h = object(raw, "Healthcheck");
  const test = strings(h.Test, "Healthcheck.Test", 4096);
  const ns = (v: unknown, field: string, dflt: number) => {
    if (v === undefined || v === null || v === 0) return dflt;
    if (typeof v !== "number" || !Number.isFinite(v) || v < 0) throw new Error(`image config: Healthcheck.${field} is not a duration`);
    return Math.min(Math.round(v / 1e6), 3_600_000);
  };
  const retries = typeof h.Retries === "number" && Number.isInteger(h.Retries) && h.Retries > 0 ? Math.min(h.Retries, 100) : 3;
  const base = { intervalMs: ns(h.Interval, "Interval", 30_000), timeoutMs: ns(h.Timeout, "Timeout", 30_000), startPeriodMs: ns(h.StartPeriod, "StartPeriod", 0), retries };
  switch (test[0]) {
    case undefined:
    case "NONE":
      return undefined;
    case "CMD":
      return test.length > 1 ? { command: test.slice(1), ...base } : undefined;
    case "CMD-SHELL":
      return test[1] ? { command: test[1], ...base } : undefined;
    default:
      throw new Error(`image config: Healthcheck.Test starts with ${JSON.stringify(test[0]).slice(0, 40)} (expected CMD, CMD-SHELL or NONE)`);
  }
}

function object(v: unknown, field: string): Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v)) throw new Error(`image config: ${field} is not an object`);
  return v as Record<string, unknown>;
}

function str(v: unknown, field: string): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string" || v.length > 4096) throw new Error(`image config: ${field} is not a string of at most 4096 characters`);
  return v;
}

function strings(v: unknown, field: string, max: number): string[] {
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v) || v.length > max || !v.every((x) => typeof x === "string" && x.length <= 65_536)) {
    throw new Error(`image config: ${field} is not a list of at most ${max} strings`);
  }
  return v as string[];
}
