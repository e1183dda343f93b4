import { spawn } from "node:child_process";
import { run } from "../../util/process.ts";
import { vmUidRange } from "../jail/index.ts";
import { classifyAddress, FLOOR_RANGES, hostRanges, inRanges, nftIntervals, PRIVATE_RANGES, type Cidr } from "./addresses.ts";
import type { AllowList } from "./policy.ts";

/**
 * nftables state for egress. One shared table; each VM's passt (and its jailed
 * QEMU) runs as a uid of its own (from the VM uid range, `vmUidRange`) and is
 * matched by `meta skuid`:
 *
 *   table inet cocoon
 *     chain output (filter, hook output): meta skuid vmap @vm_filter; any other
 *       uid of the range → only replies (QEMU's host-loopback forwards answer),
 *       else drop: a VM without egress, or whose chain is missing, sends nothing
 *     chain nat_output (nat, hook output): meta skuid vmap @vm_nat
 *     chain deny: TCP reset, else ICMP admin-prohibited, counted (Debian 12's
 *       passt does not relay the failure: the guest's connect times out)
 *     set host_nets: the networks the host is attached to (refreshed)
 *     chain vm_<uid>: established → accept; DNS (DNAT-ed) → accept; then the
 *       floors, first, whatever the policy: the host's own addresses (`fib
 *       daddr type local`: the kernel's live view, every interface),
 *       broadcast, multicast, non-IPv4, loopback, link-local, reserved → deny;
 *       then private ranges and host_nets → deny (an allow list: except those
 *       inside the operator's COCOON_EGRESS_PRIVATE_ALLOW); then
 *       internet: accept | allow list: its CIDRs (set allow_<uid>) and the
 *       addresses its names resolved to (set dns_<uid>, with timeouts) →
 *       accept, else deny
 *     chain vmnat_<uid>: 10.0.2.3:53/udp → 127.0.0.1:<dns filter port>
 */
export const TABLE = "cocoon";

/** nft processes at once over every VM: DNS answers (ResolvedSet) and VM installs wait for a slot. */
const NFT_CONCURRENCY = 4;
let nftRunning = 0;
const nftWaiting: (() => void)[] = [];

export async function nft(script: string): Promise<void> {
  if (nftRunning < NFT_CONCURRENCY) nftRunning++;
  else await new Promise<void>((resolve) => nftWaiting.push(resolve)); // the slot is handed over, not re-counted
  try {
    await runNft(script);
  } finally {
    const next = nftWaiting.shift();
    if (next) next();
    else nftRunning--;
  }
}

function runNft(script: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const child = spawn("nft", ["-f", "-"], { stdio: ["pipe", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("error", (err: NodeJS.ErrnoException) =>
      reject(err.code === "ENOENT" ? new Error("nft is not installed (Debian package nftables; run scripts/setup.sh)") : err),
    );
    child.on("close", (code) => (code === 0 ? resolve() : reject(new Error(`nft failed (exit ${code}): ${stderr.trim().slice(-800)}\n${script.slice(0, 4000)}`))));
    child.stdin.end(script);
  });
}

/** The host's IPv4 networks (its LAN, bridges): private for every VM unless the operator opens them. */
export function hostNets(): string[] {
  return nftIntervals(hostRanges().nets);
}

/** Replaces the elements of the shared host_nets set (at each VM install and when the host's addresses change). */
export async function refreshHostNets(nets = hostNets()): Promise<void> {
  await nft(`flush set inet ${TABLE} host_nets\n${nets.length ? `add element inet ${TABLE} host_nets { ${nets.join(", ")} }` : ""}`);
}

/** Creates the shared table if absent (idempotent) and refreshes the host's networks. */
export async function ensureTable(): Promise<void> {
  const uids = vmUidRange();
  const range = `${uids.first}-${uids.first + uids.count - 1}`;
  await nft(`
add table inet ${TABLE}
add set inet ${TABLE} host_nets { type ipv4_addr; flags interval; auto-merge; }
add map inet ${TABLE} vm_filter { typeof meta skuid : verdict; }
add map inet ${TABLE} vm_nat { typeof meta skuid : verdict; }
add chain inet ${TABLE} deny
flush chain inet ${TABLE} deny
add rule inet ${TABLE} deny meta l4proto tcp counter reject with tcp reset
add rule inet ${TABLE} deny counter reject with icmpx type admin-prohibited
add chain inet ${TABLE} output { type filter hook output priority 0; policy accept; }
add chain inet ${TABLE} nat_output { type nat hook output priority -100; policy accept; }
flush chain inet ${TABLE} output
flush chain inet ${TABLE} nat_output
add rule inet ${TABLE} output meta skuid vmap @vm_filter
add rule inet ${TABLE} output meta skuid ${range} ct state established,related accept
add rule inet ${TABLE} output meta skuid ${range} drop
add rule inet ${TABLE} nat_output meta skuid vmap @vm_nat
`);
  await refreshHostNets();
}

export interface VmRules {
  uid: number;
  /** 127.0.0.1 UDP port of the VM's DNS filter. */
  dnsPort: number;
  mode: "internet" | "allow";
  allow: AllowList;
  /** Private ranges the operator opened to allow lists (COCOON_EGRESS_PRIVATE_ALLOW); "internet" never reaches them. */
  privateAllow: readonly Cidr[];
}

/** Addresses a VM's names may open at once (set dns_<uid>); more answers wait for elements to time out. */
export const RESOLVED_LIMITS = { maxElements: 1024, minIntervalMs: 100 } as const;

const v4Texts = (ranges: readonly Cidr[]) => nftIntervals(ranges).join(", ");

/** Installs (or replaces) one VM's chains, sets and map entries in one transaction. */
export async function installVm(r: VmRules): Promise<void> {
  await removeVm(r.uid);
  const u = r.uid;
  const t = `inet ${TABLE}`;
  const opened = r.mode === "allow" && r.privateAllow.length ? ` ip daddr != { ${v4Texts(r.privateAllow)} }` : "";
  const lines = [
    `add set ${t} allow_${u} { type ipv4_addr; flags interval; auto-merge; }`,
    r.allow.cidrs.length ? `add element ${t} allow_${u} { ${r.allow.cidrs.join(", ")} }` : "",
    // The kernel's own cap, a backstop above ResolvedSet's: expired elements count until the kernel collects them.
    `add set ${t} dns_${u} { type ipv4_addr; flags timeout; size ${2 * RESOLVED_LIMITS.maxElements}; }`,
    `add chain ${t} vm_${u}`,
    `add rule ${t} vm_${u} ct state established,related accept`,
    `add rule ${t} vm_${u} ip daddr 127.0.0.1 udp dport ${r.dnsPort} ct status dnat accept`,
    // Floors, before anything a policy opens.
    `add rule ${t} vm_${u} fib daddr type { local, broadcast, multicast, anycast } goto deny`,
    `add rule ${t} vm_${u} meta nfproto != ipv4 goto deny`,
    `add rule ${t} vm_${u} ip daddr { ${v4Texts(FLOOR_RANGES)} } goto deny`,
    // Private ranges: only what the operator opened, and only to an allow list.
    `add rule ${t} vm_${u} ip daddr { ${v4Texts(PRIVATE_RANGES)} }${opened} goto deny`,
    `add rule ${t} vm_${u} ip daddr @host_nets${opened} goto deny`,
    ...(r.mode === "internet" ? [`add rule ${t} vm_${u} accept`] : [`add rule ${t} vm_${u} ip daddr @allow_${u} accept`, `add rule ${t} vm_${u} ip daddr @dns_${u} accept`]),
    `add rule ${t} vm_${u} goto deny`,
    `add chain ${t} vmnat_${u}`,
    `add rule ${t} vmnat_${u} ip daddr 10.0.2.3 udp dport 53 dnat ip to 127.0.0.1:${r.dnsPort}`,
    `add element ${t} vm_filter { ${u} : jump vm_${u} }`,
    `add element ${t} vm_nat { ${u} : jump vmnat_${u} }`,
  ];
  await nft(lines.filter(Boolean).join("\n"));
}

/**
 * The addresses a VM's allowed names resolved to, written to its nftables set
 * (`dns_<uid>`) with the answer's TTL as the element's timeout. A guest that
 * resolves thousands of names must not fork thousands of nft processes or
 * grow the set without end, so:
 * - a floor (loopback, link-local, the host, …) or a private address outside
 *   the operator's allowance is never written (the rules deny it too);
 * - an address already open for at least half the new TTL is not rewritten;
 * - writes are batched: one nft process per VM at a time and at most one per
 *   `minIntervalMs`; answers arriving meanwhile join the next batch;
 * - at most `maxElements` live addresses; beyond, an answer's new addresses
 *   are not opened until older ones time out.
 * `add` resolves once its addresses are in the set (or were left out).
 */
export class ResolvedSet {
  /** Addresses written and when (ms) their elements time out, at the latest. */
  private readonly expiresAt = new Map<string, number>();
  private pending = new Map<string, number>();
  /** Addresses queued or being written that are not in `expiresAt` yet: they count against the cap too. */
  private readonly unwritten = new Set<string>();
  private waiters: { resolve: () => void; reject: (err: Error) => void }[] = [];
  private flushing = false;
  private lastRunAt = 0;
  private closed = false;
  private lastLogAt = 0;
  readonly stats = { nftRuns: 0, written: 0, leftOutAtCap: 0, notPublic: 0 };
  private readonly maxElements: number;
  private readonly minIntervalMs: number;

  /** `set`: e.g. "inet cocoon dns_1543503872". */
  constructor(
    private readonly set: string,
    private readonly opts: { privateAllow: readonly Cidr[]; maxElements?: number; minIntervalMs?: number; log?: (msg: string) => void },
  ) {
    this.maxElements = opts.maxElements ?? RESOLVED_LIMITS.maxElements;
    this.minIntervalMs = opts.minIntervalMs ?? RESOLVED_LIMITS.minIntervalMs;
  }

  add(ips: string[], ttlSeconds: number): Promise<void> {
    const now = Date.now();
    const host = hostRanges();
    let queued = false;
    for (const ip of ips) {
      const kind = classifyAddress(ip, host)?.kind;
      if (kind === "floor" || (kind === "private" && !inRanges(ip, this.opts.privateAllow))) {
        this.stats.notPublic++;
        continue;
      }
      const until = this.expiresAt.get(ip);
      if (until !== undefined && until - now >= (ttlSeconds * 1000) / 2) continue;
      if (until === undefined && !this.unwritten.has(ip)) {
        if (!this.hasRoom(now)) {
          this.stats.leftOutAtCap++;
          this.warn(`${this.set}: ${this.maxElements} addresses open, the most a VM may have; an answer's new addresses wait for older ones to time out`);
          continue;
        }
        this.unwritten.add(ip);
      }
      this.pending.set(ip, Math.max(this.pending.get(ip) ?? 0, ttlSeconds));
      queued = true;
    }
    if (!queued) return Promise.resolve();
    const written = new Promise<void>((resolve, reject) => this.waiters.push({ resolve, reject }));
    if (!this.flushing) void this.flush();
    return written;
  }

  /** No more writes; what waits is released with an error. */
  close(): void {
    this.closed = true;
    for (const w of this.waiters.splice(0)) w.reject(new Error(`${this.set} is closed`));
    this.pending.clear();
    this.unwritten.clear();
  }

  private hasRoom(now: number): boolean {
    if (this.expiresAt.size + this.unwritten.size < this.maxElements) return true;
    for (const [ip, until] of this.expiresAt) if (until <= now) this.expiresAt.delete(ip);
    return this.expiresAt.size + this.unwritten.size < this.maxElements;
  }

  private async flush(): Promise<void> {
    this.flushing = true;
    while (this.pending.size > 0 && !this.closed) {
      const wait = this.lastRunAt + this.minIntervalMs - Date.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      const batch = this.pending;
      const waiters = this.waiters;
      this.pending = new Map();
      this.waiters = [];
      this.lastRunAt = Date.now();
      try {
        await nft(this.script(batch));
        this.stats.nftRuns++;
        this.stats.written += batch.size;
        for (const [ip, ttl] of batch) this.expiresAt.set(ip, this.lastRunAt + ttl * 1000);
        for (const w of waiters) w.resolve();
      } catch (err) {
        for (const w of waiters) w.reject(err as Error);
      }
      for (const ip of batch.keys()) this.unwritten.delete(ip);
    }
    this.flushing = false;
  }

  /** add + delete + add: creates each element, or refreshes the timeout of one that is already there. */
  private script(batch: Map<string, number>): string {
    const ips = [...batch.keys()].join(", ");
    const timed = [...batch].map(([ip, ttl]) => `${ip} timeout ${ttl}s`).join(", ");
    return `add element ${this.set} { ${ips} }\ndelete element ${this.set} { ${ips} }\nadd element ${this.set} { ${timed} }`;
  }

  private warn(msg: string): void {
    if (Date.now() - this.lastLogAt < 10_000) return;
    this.lastLogAt = Date.now();
    this.opts.log?.(`dns: ${msg}`);
  }
}

/** Removes everything `installVm` added for `uid`; absent parts are skipped. */
export async function removeVm(uid: number): Promise<void> {
  const t = `inet ${TABLE}`;
  const steps = [
    `delete element ${t} vm_filter { ${uid} }`,
    `delete element ${t} vm_nat { ${uid} }`,
    `flush chain ${t} vm_${uid}`,
    `delete chain ${t} vm_${uid}`,
    `flush chain ${t} vmnat_${uid}`,
    `delete chain ${t} vmnat_${uid}`,
    `delete set ${t} allow_${uid}`,
    `delete set ${t} dns_${uid}`,
  ];
  try {
    await nft(steps.join("\n"));
  } catch {
    for (const s of steps) await nft(s).catch(() => undefined);
  }
}

/** Every nft object of the table that belongs to `uid` (for tests and leak checks). */
export async function vmObjects(uid: number): Promise<string[]> {
  const out = await run("nft", ["list", "table", "inet", TABLE]).catch(() => "");
  return out.split("\n").filter((l) => l.includes(String(uid)));
}
