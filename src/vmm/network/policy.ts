import { isIPv4 } from "node:net";
import { InvalidArgumentError } from "../../errors.ts";

/**
 * A VM's egress policy (API.md `network.egress`):
 * - "none": no packet leaves the VM;
 * - "internet": public addresses only;
 * - { allow }: only the listed IPv4 CIDRs and domain names ("*.example.org"
 *   matches every name under example.org, not example.org itself).
 * In every mode the host, private, link-local and multicast ranges and other
 * VMs are unreachable, except a CIDR an allow list names explicitly (the host's
 * own addresses never are).
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
  constructor(message: string) {
    super("network.egress", message);
    this.name = "InvalidEgressError";
  }
}

/**
 * Destinations a guest never reaches unless an allow entry names them: "this"
 * network, private (RFC 1918), shared (CGNAT), loopback, link-local (cloud
 * metadata), IETF protocol assignments, benchmarking, multicast, reserved and
 * broadcast. The host's own addresses and on-link subnets are blocked too
 * (by nftables `fib` and a set refreshed from the routing table).
 */
export const BLOCKED_V4 = [
  "0.0.0.0/8",
  "10.0.0.0/8",
  "100.64.0.0/10",
  "127.0.0.0/8",
  "169.254.0.0/16",
  "172.16.0.0/12",
  "192.0.0.0/24",
  "192.168.0.0/16",
  "198.18.0.0/15",
  "224.0.0.0/4",
  "240.0.0.0/4",
] as const;

const LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;

function isDomain(name: string): boolean {
  return name.length <= 253 && name.includes(".") && name.split(".").every((l) => LABEL.test(l)) && !/^[\d.]+$/.test(name);
}

function parseCidr(entry: string): string | undefined {
  const [addr, bits, extra] = entry.split("/");
  if (extra !== undefined || !addr || !isIPv4(addr)) return undefined;
  const prefix = bits === undefined ? 32 : Number(bits);
  if (!/^\d{1,2}$/.test(bits ?? "32") || prefix > 32) return undefined;
  // Normalise to the network address so nftables accepts it.
  const n = addr.split(".").reduce((acc, o) => acc * 256 + Number(o), 0);
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  const net = (n & mask) >>> 0;
  return `${[24, 16, 8, 0].map((s) => (net >>> s) & 255).join(".")}/${prefix}`;
}

/** Validates an egress value from the API or a record; throws InvalidEgressError naming the bad entry. */
export function parseEgress(value: unknown): Egress {
  if (value === undefined || value === null) return "none";
  if (value === "none" || value === "internet") return value;
  if (typeof value === "object" && !Array.isArray(value) && Array.isArray((value as { allow?: unknown }).allow)) {
    const allow = (value as { allow: unknown[] }).allow;
    if (Object.keys(value).length !== 1) throw new InvalidEgressError(`network.egress allows only the key "allow"`);
    if (allow.length > 256) throw new InvalidEgressError("network.egress.allow holds at most 256 entries");
    for (const entry of allow) {
      if (typeof entry !== "string") throw new InvalidEgressError(`network.egress.allow entries must be strings, got ${JSON.stringify(entry)}`);
    }
    splitAllowList(allow as string[]);
    return { allow: [...(allow as string[])] };
  }
  throw new InvalidEgressError(`network.egress must be "none", "internet" or {"allow": [...]}, got ${JSON.stringify(value)}`);
}

/** Splits allow entries into CIDRs, names and wildcard suffixes; throws on an entry that is none of them. */
export function splitAllowList(entries: string[]): AllowList {
  const list: AllowList = { cidrs: [], names: [], suffixes: [] };
  for (const raw of entries) {
    const entry = raw.trim().toLowerCase().replace(/\.$/, "");
    const cidr = /^[\d./]+$/.test(entry) ? parseCidr(entry) : undefined;
    if (cidr) list.cidrs.push(cidr);
    else if (entry.startsWith("*.") && isDomain(entry.slice(2))) list.suffixes.push(entry.slice(2));
    else if (isDomain(entry)) list.names.push(entry);
    else throw new InvalidEgressError(`network.egress.allow: "${raw}" is not an IPv4 address, CIDR, domain name or *.domain wildcard`);
  }
  return list;
}

/** True when a DNS name (any case, optional trailing dot) is allowed by the list. */
export function nameAllowed(list: AllowList, qname: string): boolean {
  const name = qname.toLowerCase().replace(/\.$/, "");
  return list.names.includes(name) || list.suffixes.some((s) => name.endsWith(`.${s}`));
}

export const egressLabel = (e: Egress): string => (typeof e === "string" ? e : `allow(${e.allow.join(",")})`);
