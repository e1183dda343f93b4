import { ApiError } from "../errors.ts";
import type { MicroVmService } from "../lifecycle/microvms.ts";
import type { AccessTokens, PortSelection } from "./access-tokens.ts";

/** A requested port set: one port, a range, or every port (AWS PortSpecification). */
export type PortSpec = { port: number } | { range: { startPort: number; endPort: number } } | { allPorts: true };

export const GRANT_LIMITS = { expiresInMinutes: { min: 1, max: 60 }, specs: 32, expandedPorts: 256 } as const;

/**
 * Issues an endpoint access token for a VM of the tenant (AWS
 * CreateMicrovmAuthToken, `POST /v1/microvms/{id}/auth-tokens`): it opens
 * only the requested guest ports at `{port}-{id}.{domain}` (the app port also
 * at `{id}.{domain}`), sent as `X-aws-proxy-auth`, until it expires (1–60 min).
 * Several specs become one set: all ports if any says so, one range alone,
 * else the listed ports with ranges expanded (at most 256 ports).
 */
export async function grantAccessToken(
  tokens: AccessTokens,
  microvms: MicroVmService,
  tenantId: string,
  id: string,
  req: { ports: PortSpec[]; expiresInMinutes: number },
): Promise<{ token: string; expiresAt: Date }> {
  const expiresAt = await expiry(microvms, tenantId, id, req.expiresInMinutes);
  return { token: tokens.issue({ microVmId: id, ports: selection(req.ports), expiresAt }), expiresAt };
}

/** A token that opens the VM's shell (`GET /v1/microvms/{id}/shell`) until it expires; issued with the shell tokens' own secret. */
export async function grantShellToken(shellTokens: AccessTokens, microvms: MicroVmService, tenantId: string, id: string, expiresInMinutes: number): Promise<{ token: string; expiresAt: Date }> {
  const expiresAt = await expiry(microvms, tenantId, id, expiresInMinutes);
  return { token: shellTokens.issue({ microVmId: id, ports: { all: true }, expiresAt }), expiresAt };
}

async function expiry(microvms: MicroVmService, tenantId: string, id: string, minutes: number): Promise<Date> {
  const row = await microvms.get(tenantId, id);
  if (row.state === "TERMINATED" || row.state === "TERMINATING") throw new ApiError("InvalidState", `microVM ${id} is ${row.state}`, { state: row.state });
  const { min, max } = GRANT_LIMITS.expiresInMinutes;
  if (!Number.isInteger(minutes) || minutes < min || minutes > max) {
    throw new ApiError("ValidationError", `expirationInMinutes must be an integer between ${min} and ${max}, got ${minutes}`, { field: "expirationInMinutes" });
  }
  return new Date(Date.now() + minutes * 60_000);
}

function selection(specs: PortSpec[]): PortSelection {
  if (!specs.length || specs.length > GRANT_LIMITS.specs) throw bad(`allowedPorts needs 1 to ${GRANT_LIMITS.specs} entries, got ${specs.length}`);
  const ports = new Set<number>();
  const ranges: { from: number; to: number }[] = [];
  for (const spec of specs) {
    const kinds = Object.keys(spec).filter((k) => (spec as Record<string, unknown>)[k] !== undefined);
    if (kinds.length !== 1) throw bad(`each allowedPorts entry sets exactly one of port, range, allPorts; got ${kinds.join(", ") || "none"}`);
    const kind = kinds[0];
    if (kind === "allPorts") return { all: true };
    if (kind === "port") ports.add(checkPort((spec as { port: unknown }).port, "port"));
    else if (kind !== "range") throw bad(`unknown allowedPorts entry ${kind}`);
    else {
      const range = (spec as { range?: { startPort?: unknown; endPort?: unknown } }).range;
      const from = checkPort(range?.startPort, "range.startPort");
      const to = checkPort(range?.endPort, "range.endPort");
      if (from > to) throw bad(`range.startPort ${from} is above range.endPort ${to}`);
      ranges.push({ from, to });
    }
  }
  if (ranges.length === 1 && ports.size === 0) return ranges[0]!;
  for (const r of ranges) {
    if (ports.size + (r.to - r.from + 1) > GRANT_LIMITS.expandedPorts) {
      throw bad(`ports and ranges together may open at most ${GRANT_LIMITS.expandedPorts} ports; use one range alone, or allPorts`);
    }
    for (let p = r.from; p <= r.to; p++) ports.add(p);
  }
  return { ports: [...ports].sort((a, b) => a - b) };
}

function checkPort(value: unknown, field: string): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 1 || value > 65_535) throw bad(`allowedPorts ${field} must be an integer between 1 and 65535, got ${JSON.stringify(value)}`);
  return value;
}

const bad = (message: string) => new ApiError("ValidationError", message, { field: "allowedPorts" });
