import { InvalidArgumentError } from "../../errors.ts";
import { cidrListFromEnv, describeRange, FLOOR_RANGES, hostRanges, parseCidr, PRIVATE_RANGES, uncoveredOverlap, type Cidr } from "./addresses.ts";

/**
 * A VM's egress policy (docs/api.md `network.egress`):
 * - "none": no packet leaves the VM;
 * - "internet": public addresses only;
 * - { allow }: only the listed IPv4 CIDRs and domain names ("*.example.org"
 *   matches every name under example.org, not example.org itself).
 * Floors hold in every mode: loopback, link-local (cloud metadata), multicast,
 * broadcast, reserved, the host's own addresses and other VMs are never
 * reachable. Private ranges (RFC 1918, CGNAT, the host's networks, …) only
 * where the operator allows them (COCOON_EGRESS_PRIVATE_ALLOW) and an allow
 * list opens them; "internet" never reaches them.
 */
export type Egress = "none" | "internet" | { allow: string[] };

/** An allow list split into what nftables and the DNS filter need. */
export interface AllowList {
  cidrs: string[];
  /** Exact names, lower case, no trailing dot. */
  names: string[];
  /** Wildcard suffixes: "*.example.org" → "example.org". */
  suffixes: string[];
}

export class InvalidEgressError extends InvalidArgumentError {
  constructor(message: string, field = "network.egress") {
    super(field, message);
    this.name = "InvalidEgressError";
  }
}

/**
 * The private ranges the operator lets allow lists open
 * (COCOON_EGRESS_PRIVATE_ALLOW, comma-separated IPv4 CIDRs, empty by
 * default), read at each use. A floor cannot be lifted: a range overlapping
 * one is an error naming the variable.
 */
export function egressPrivateAllow(env: NodeJS.ProcessEnv = process.env): Cidr[] {
  const list = cidrListFromEnv("COCOON_EGRESS_PRIVATE_ALLOW", env, { family: 4 });
  for (const cidr of list) {
    const floor = uncoveredOverlap(cidr, FLOOR_RANGES);
    if (floor) throw new Error(`COCOON_EGRESS_PRIVATE_ALLOW: ${cidr.text} overlaps ${describeRange(floor)}, which no setting opens`);
  }
  return list;
}

const LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;

function isDomain(name: string): boolean {
  return name.length <= 253 && name.includes(".") && name.split(".").every((l) => LABEL.test(l)) && !/^[\d.]+$/.test(name);
}

type AllowEntry = { kind: "cidr"; cidr: Cidr } | { kind: "name"; name: string } | { kind: "suffix"; suffix: string };

function parseAllowEntry(raw: string, field: string): AllowEntry {
  const entry = raw.trim().toLowerCase().replace(/\.$/, "");
  const cidr = /^[\d./]+$/.test(entry) ? parseCidr(entry) : undefined;
  if (cidr) return { kind: "cidr", cidr };
  if (entry.startsWith("*.") && isDomain(entry.slice(2))) return { kind: "suffix", suffix: entry.slice(2) };
  if (isDomain(entry)) return { kind: "name", name: entry };
  throw new InvalidEgressError(`${field}: "${raw}" is not an IPv4 address, CIDR, domain name or *.domain wildcard`, field);
}

/**
 * Validates a new egress policy from the API or a caller; throws
 * InvalidEgressError naming the bad entry (`network.egress.allow[3]`): not a
 * CIDR or name, `0.0.0.0/0`, a range overlapping a floor (loopback,
 * link-local, multicast, the host's own addresses) or a private range outside
 * `privateAllow`. Stored records are not re-checked (`splitAllowList`): the
 * nftables rules deny what a changed setting no longer allows.
 */
export function parseEgress(value: unknown, privateAllow: readonly Cidr[] = egressPrivateAllow()): Egress {
  if (value === undefined || value === null) return "none";
  if (value === "none" || value === "internet") return value;
  if (typeof value === "object" && !Array.isArray(value) && Array.isArray((value as { allow?: unknown }).allow)) {
    const allow = (value as { allow: unknown[] }).allow;
    if (Object.keys(value).length !== 1) throw new InvalidEgressError(`network.egress allows only the key "allow"`);
    if (allow.length > 256) throw new InvalidEgressError("network.egress.allow holds at most 256 entries", "network.egress.allow");
    const host = hostRanges();
    allow.forEach((entry, i) => {
      const field = `network.egress.allow[${i}]`;
      if (typeof entry !== "string") throw new InvalidEgressError(`${field} must be a string, got ${JSON.stringify(entry)}`, field);
      const parsed = parseAllowEntry(entry, field);
      if (parsed.kind !== "cidr") return;
      const cidr = parsed.cidr;
      if (cidr.first === 0n && cidr.last === 0xffffffffn) throw new InvalidEgressError(`${field}: ${entry} would open every address; use "internet" (public addresses only)`, field);
      const floor = uncoveredOverlap(cidr, [...FLOOR_RANGES, ...host.addresses]);
      if (floor) throw new InvalidEgressError(`${field}: ${entry} overlaps ${describeRange(floor)}, which is never reachable`, field);
      const priv = uncoveredOverlap(cidr, [...PRIVATE_RANGES, ...host.nets], privateAllow);
      if (priv) throw new InvalidEgressError(`${field}: ${entry} overlaps ${describeRange(priv)}, which the operator has not opened (COCOON_EGRESS_PRIVATE_ALLOW)`, field);
    });
    return { allow: [...(allow as string[])] };
  }
  throw new InvalidEgressError(`network.egress must be "none", "internet" or {"allow": [...]}, got ${JSON.stringify(value)}`);
}

/** Splits allow entries (validated by parseEgress when the VM was created) into CIDRs, names and wildcard suffixes. */
export function splitAllowList(entries: string[]): AllowList {
  const list: AllowList = { cidrs: [], names: [], suffixes: [] };
  entries.forEach((raw, i) => {
    const e = parseAllowEntry(raw, `network.egress.allow[${i}]`);
    if (e.kind === "cidr") list.cidrs.push(e.cidr.text);
    else if (e.kind === "name") list.names.push(e.name);
    else list.suffixes.push(e.suffix);
  });
  return list;
}

/** True when a DNS name (any case, optional trailing dot) is allowed by the list. */
export function nameAllowed(list: AllowList, qname: string): boolean {
  const name = qname.toLowerCase().replace(/\.$/, "");
  return list.names.includes(name) || list.suffixes.some((s) => name.endsWith(`.${s}`));
}
