import { isIPv4, isIPv6 } from "node:net";
import { networkInterfaces } from "node:os";

/**
 * Address ranges as integer intervals, and which ones are not public. Used by
 * the egress policy (allow-list checks, nftables rules, DNS answers) and by
 * code-URI intake (which addresses the server itself may fetch from).
 */

/** A CIDR as the interval [first, last] of its family's address space; `text` is normalised to the network address. */
export interface Cidr {
  family: 4 | 6;
  first: bigint;
  last: bigint;
  text: string;
}

/** A range that is not public, with what it is. `hidden`: its address is the host's and is never echoed to a tenant. */
export interface NamedRange extends Cidr {
  what: string;
  hidden?: boolean;
}

const BITS = { 4: 32, 6: 128 } as const;

function v4ToBigInt(ip: string): bigint {
  return ip.split(".").reduce((acc, o) => (acc << 8n) | BigInt(Number(o)), 0n);
}

/** Expands an IPv6 address (with `::` or a dotted IPv4 tail) to its 128-bit value; the caller checked isIPv6. */
function v6ToBigInt(ip: string): bigint {
  let text = ip.replace(/%.*$/, ""); // zone index: not part of the address
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4) {
    const n = v4ToBigInt(v4[1]!);
    text = `${text.slice(0, -v4[1]!.length)}${(n >> 16n).toString(16)}:${(n & 0xffffn).toString(16)}`;
  }
  const [head, tail] = text.split("::") as [string, string | undefined];
  const groups = (s: string | undefined) => (s ? s.split(":") : []);
  const parts = tail === undefined ? groups(head) : [...groups(head), ...Array(8 - groups(head).length - groups(tail).length).fill("0"), ...groups(tail)];
  return parts.reduce((acc, g) => (acc << 16n) | BigInt(parseInt(g, 16)), 0n);
}

function formatAddress(family: 4 | 6, n: bigint): string {
  if (family === 4) return [24n, 16n, 8n, 0n].map((s) => (n >> s) & 255n).join(".");
  const groups = [...Array(8).keys()].map((i) => ((n >> BigInt(112 - 16 * i)) & 0xffffn).toString(16));
  // Node's URL parser writes the canonical compressed form.
  return new URL(`http://[${groups.join(":")}]`).hostname.slice(1, -1);
}

/** Parses "a.b.c.d", "a.b.c.d/n", an IPv6 address or "v6/n"; undefined when it is none of them. */
export function parseCidr(entry: string): Cidr | undefined {
  const [addr, bits, extra] = entry.split("/");
  if (extra !== undefined || !addr) return undefined;
  const family = isIPv4(addr) ? 4 : isIPv6(addr) && !addr.includes("%") ? 6 : undefined;
  if (!family || (family === 4 && !/^[\d.]+$/.test(addr))) return undefined;
  if (bits !== undefined && !/^\d{1,3}$/.test(bits)) return undefined;
  const prefix = bits === undefined ? BITS[family] : Number(bits);
  if (prefix > BITS[family]) return undefined;
  const size = 1n << BigInt(BITS[family] - prefix);
  const n = family === 4 ? v4ToBigInt(addr) : v6ToBigInt(addr);
  const first = n - (n % size);
  return { family, first, last: first + size - 1n, text: `${formatAddress(family, first)}/${prefix}` };
}

/** The single address `ip` as a /32 or /128; undefined when it is not an address. */
export function addressCidr(ip: string): Cidr | undefined {
  return ip.includes("/") ? undefined : parseCidr(ip.replace(/^\[(.*)\]$/, "$1"));
}

const named = (cidr: string, what: string): NamedRange => ({ ...parseCidr(cidr)!, what });

/**
 * Never reachable by a guest, whatever its policy or the operator's settings:
 * loopback (the host's own services and every VM's forwarded ports),
 * link-local (cloud metadata at 169.254.169.254), multicast, reserved and
 * broadcast. The host's own addresses join them at each check (`hostRanges`).
 */
export const FLOOR_RANGES: readonly NamedRange[] = [
  named("0.0.0.0/32", "the unspecified address"),
  named("127.0.0.0/8", "loopback"),
  named("169.254.0.0/16", "link-local, cloud metadata"),
  named("224.0.0.0/4", "multicast"),
  named("240.0.0.0/4", "reserved and broadcast"),
  named("::/128", "the unspecified address"),
  named("::1/128", "loopback"),
  named("fe80::/10", "link-local"),
  named("ff00::/8", "multicast"),
];

/** Not public: reachable only inside an operator's allowance (COCOON_EGRESS_PRIVATE_ALLOW, COCOON_CODE_URI_PRIVATE_ALLOW). */
export const PRIVATE_RANGES: readonly NamedRange[] = [
  named("0.0.0.0/8", "\"this\" network"),
  named("10.0.0.0/8", "private"),
  named("100.64.0.0/10", "shared address space, CGNAT"),
  named("172.16.0.0/12", "private"),
  named("192.0.0.0/24", "IETF protocol assignments"),
  named("192.168.0.0/16", "private"),
  named("198.18.0.0/15", "benchmarking"),
  named("fc00::/7", "unique local, private"),
];

/**
 * The host's own addresses (floors) and the networks it is attached to
 * (private: its LAN), read from the interfaces at each call (getifaddrs, no
 * process), so an address added while the server runs counts at once.
 */
export function hostRanges(): { addresses: NamedRange[]; nets: NamedRange[] } {
  const addresses: NamedRange[] = [];
  const nets: NamedRange[] = [];
  for (const infos of Object.values(networkInterfaces())) {
    for (const info of infos ?? []) {
      const address = addressCidr(info.address);
      if (address) addresses.push({ ...address, what: "an address of the host", hidden: true });
      const net = info.cidr ? parseCidr(info.cidr) : undefined;
      if (net) nets.push({ ...net, what: "a network the host is attached to", hidden: true });
    }
  }
  return { addresses, nets };
}

export const overlaps = (a: Cidr, b: Cidr) => a.family === b.family && a.first <= b.last && b.first <= a.last;

/** True when every address of [first, last] lies in one of `ranges` (of the same family). */
export function covered(family: 4 | 6, first: bigint, last: bigint, ranges: readonly Cidr[]): boolean {
  let next = first;
  for (const r of [...ranges].filter((r) => r.family === family).sort((a, b) => (a.first < b.first ? -1 : a.first > b.first ? 1 : 0))) {
    if (r.first > next) return false;
    if (r.last >= next) next = r.last + 1n;
    if (next > last) return true;
  }
  return next > last;
}

/** How a range is named in a message: a host range by what it is only. */
export const describeRange = (r: NamedRange) => (r.hidden ? r.what : `${r.text} (${r.what})`);

/** The first of `ranges` that `cidr` overlaps in a part not covered by `allow`. */
export function uncoveredOverlap(cidr: Cidr, ranges: readonly NamedRange[], allow: readonly Cidr[] = []): NamedRange | undefined {
  return ranges.find((r) => overlaps(cidr, r) && !covered(cidr.family, max(cidr.first, r.first), min(cidr.last, r.last), allow));
}
const max = (a: bigint, b: bigint) => (a > b ? a : b);
const min = (a: bigint, b: bigint) => (a < b ? a : b);

/** An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address it carries. */
function unmapped(c: Cidr): Cidr {
  if (c.family === 6 && c.first >> 32n === 0xffffn && c.first === c.last) {
    const v4 = c.first & 0xffffffffn;
    return { family: 4, first: v4, last: v4, text: `${formatAddress(4, v4)}/32` };
  }
  return c;
}

/**
 * What the single address `ip` is when it is not public: a floor (never
 * reachable by a guest) or private. undefined: public. Not an address: a floor.
 */
export function classifyAddress(ip: string, host = hostRanges()): { kind: "floor" | "private"; range: NamedRange } | undefined {
  const parsed = addressCidr(ip);
  if (!parsed) return { kind: "floor", range: { family: 4, first: 0n, last: 0n, text: ip, what: "not an address", hidden: true } };
  const c = unmapped(parsed);
  const floor = [...FLOOR_RANGES, ...host.addresses].find((r) => overlaps(c, r));
  if (floor) return { kind: "floor", range: floor };
  const priv = [...PRIVATE_RANGES, ...host.nets].find((r) => overlaps(c, r));
  return priv ? { kind: "private", range: priv } : undefined;
}

/** True when `ip` lies in one of `ranges` (an IPv4-mapped IPv6 address as its IPv4 address). */
export function inRanges(ip: string, ranges: readonly Cidr[]): boolean {
  const c = addressCidr(ip);
  return c !== undefined && ranges.some((r) => overlaps(unmapped(c), r));
}

/**
 * An operator's comma-separated CIDR list from `variable` (empty or unset:
 * none). Throws naming the variable and the entry.
 */
export function cidrListFromEnv(variable: string, env: NodeJS.ProcessEnv = process.env, opts: { family?: 4 } = {}): Cidr[] {
  const raw = env[variable] ?? "";
  const out: Cidr[] = [];
  for (const entry of raw.split(",").map((e) => e.trim()).filter(Boolean)) {
    const cidr = parseCidr(entry);
    if (!cidr) throw new Error(`${variable}: "${entry}" is not a CIDR (a.b.c.d/n${opts.family === 4 ? "" : " or an IPv6 prefix"})`);
    if (opts.family && cidr.family !== opts.family) throw new Error(`${variable}: "${entry}" is IPv6; only IPv4 ranges apply here`);
    out.push(cidr);
  }
  return out;
}

/** nftables set elements for `ranges` (IPv4), merged so that no two overlap (an anonymous set refuses overlaps). */
export function nftIntervals(ranges: readonly Cidr[]): string[] {
  const sorted = ranges.filter((r) => r.family === 4).sort((a, b) => (a.first < b.first ? -1 : a.first > b.first ? 1 : 0));
  const merged: { first: bigint; last: bigint }[] = [];
  for (const r of sorted) {
    const prev = merged.at(-1);
    if (prev && r.first <= prev.last + 1n) prev.last = max(prev.last, r.last);
    else merged.push({ first: r.first, last: r.last });
  }
  return merged.map((m) => (m.first === m.last ? formatAddress(4, m.first) : `${formatAddress(4, m.first)}-${formatAddress(4, m.last)}`));
}
