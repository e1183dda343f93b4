import { createSocket, type RemoteInfo, type Socket } from "node:dgram";
import { readFileSync } from "node:fs";
import { isIPv4 } from "node:net";

/**
 * A VM's DNS resolver on the host (127.0.0.1, UDP). The guest's 10.0.2.3:53 is
 * DNAT-ed here by nftables. It forwards allowed questions to the host's
 * resolver; for an allow list, names outside it get REFUSED without any query
 * leaving the host, and the IPv4 answers to allowed names are handed to
 * `onResolved` (which opens them in the VM's nftables set) before the guest
 * sees the answer.
 *
 * Every datagram is hostile: the parser bounds names (255 octets, pointers
 * only backwards, so no loops), and a filter holds at most `maxInFlight`
 * queries (waiting for the upstream or nftables) and takes each from a budget
 * shared by every VM; a query beyond either gets SERVFAIL at once, so a flood
 * costs neither sockets nor memory beyond those bounds.
 */
export interface DnsFilterOpts {
  /** undefined: every name is allowed (internet mode). */
  allowName?: (qname: string) => boolean;
  onResolved?: (ips: string[], ttlSeconds: number) => Promise<void>;
  /** The resolver to forward to, "a.b.c.d" or "a.b.c.d:port" (default `dnsUpstream()`). */
  upstream?: string;
  /** Queries this filter holds at once (default DNS_LIMITS.inFlightPerVm). */
  maxInFlight?: number;
  /** Shared by every VM's filter (default: one of this filter's own of DNS_LIMITS.inFlightTotal). */
  budget?: DnsBudget;
  log?: (msg: string) => void;
}

export const DNS_LIMITS = {
  /** Queries one VM may have waiting for the upstream resolver or nftables. */
  inFlightPerVm: 32,
  /** The same over every VM of the server. */
  inFlightTotal: 256,
  upstreamTimeoutMs: 4000,
  /** A larger datagram is not a query a stub resolver sends (EDNS queries are well under 1 KiB): dropped. */
  maxQueryBytes: 4096,
  /** A filter logs trouble (overload, upstream failures) at most this often. */
  logIntervalMs: 10_000,
} as const;

const RCODE = { FORMERR: 1, SERVFAIL: 2, NOTIMP: 4, REFUSED: 5 } as const;

/** Queries in flight over several filters, taken before a query is forwarded and released when it is answered. */
export class DnsBudget {
  private used = 0;
  constructor(readonly limit: number) {}
  take(): boolean {
    if (this.used >= this.limit) return false;
    this.used++;
    return true;
  }
  release(): void {
    this.used--;
  }
  get inFlight(): number {
    return this.used;
  }
}

export class DnsFilter {
  /** Counts since start: forwarded, refused (name not allowed), overloaded (SERVFAIL at a limit), malformed, failed (upstream or nftables). */
  readonly stats = { forwarded: 0, refused: 0, overloaded: 0, malformed: 0, failed: 0 };
  private inFlight = 0;
  private lastLogAt = 0;
  private readonly maxInFlight: number;
  private readonly budget: DnsBudget;

  private constructor(
    private readonly socket: Socket,
    readonly port: number,
    private readonly upstream: { address: string; port: number },
    private readonly opts: DnsFilterOpts,
  ) {
    this.maxInFlight = opts.maxInFlight ?? DNS_LIMITS.inFlightPerVm;
    this.budget = opts.budget ?? new DnsBudget(DNS_LIMITS.inFlightTotal);
  }

  static async start(opts: DnsFilterOpts, port = 0): Promise<DnsFilter> {
    const upstream = parseUpstream(opts.upstream ?? dnsUpstream());
    const socket = createSocket("udp4");
    await new Promise<void>((resolve, reject) => {
      socket.once("error", reject);
      socket.bind(port, "127.0.0.1", () => {
        socket.off("error", reject);
        resolve();
      });
    });
    const filter = new DnsFilter(socket, socket.address().port, upstream, opts);
    socket.on("message", (msg, from) => filter.onQuery(msg, from));
    socket.on("error", (err) => opts.log?.(`dns socket: ${err.message}`));
    return filter;
  }

  close(): void {
    try {
      this.socket.close();
    } catch {
      // already closed
    }
  }

  private onQuery(msg: Buffer, from: RemoteInfo): void {
    const q = parseQuery(msg);
    if (!q) {
      this.stats.malformed++;
      return;
    }
    if ("rcode" in q) {
      this.stats.malformed++;
      return this.reply(errorReply(msg, q.rcode), from);
    }
    // Only host-name characters: a label holding a dot or odd bytes must not be read as a different name than the upstream resolves.
    if (this.opts.allowName && !(q.labels.every((l) => /^[a-z0-9_-]+$/i.test(l)) && this.opts.allowName(q.labels.join(".")))) {
      this.stats.refused++;
      return this.reply(errorReply(msg, RCODE.REFUSED), from);
    }
    if (this.inFlight >= this.maxInFlight || !this.budget.take()) {
      this.stats.overloaded++;
      this.warn(`over the limit of ${this.maxInFlight} queries in flight per VM, ${this.budget.limit} in all: answering SERVFAIL`);
      return this.reply(errorReply(msg, RCODE.SERVFAIL), from);
    }
    this.inFlight++;
    this.stats.forwarded++;
    void this.resolve(msg)
      .then(
        (reply) => this.reply(reply, from),
        (err: Error) => {
          this.stats.failed++;
          this.warn(err.message);
          this.reply(errorReply(msg, RCODE.SERVFAIL), from);
        },
      )
      .finally(() => {
        this.inFlight--;
        this.budget.release();
      });
  }

  private async resolve(msg: Buffer): Promise<Buffer> {
    const reply = await forward(msg, this.upstream);
    if (this.opts.onResolved) {
      const { ips, ttl } = answersA(reply);
      // Clamped: a tiny TTL must not break a connect that follows the lookup, a huge one must not keep an address open for days.
      await this.opts.onResolved(ips, Math.min(Math.max(ttl, 60), 3600));
    }
    return reply;
  }

  private reply(buf: Buffer, to: RemoteInfo): void {
    try {
      this.socket.send(buf, to.port, to.address, () => undefined); // a full buffer: the guest retries
    } catch {
      // closed meanwhile (the VM was suspended or ended): nobody to answer
    }
  }

  private warn(msg: string): void {
    const now = Date.now();
    if (now - this.lastLogAt < DNS_LIMITS.logIntervalMs) return;
    this.lastLogAt = now;
    this.opts.log?.(`dns: ${msg} (so far: ${JSON.stringify(this.stats)})`);
  }
}

/** First IPv4 nameserver of /etc/resolv.conf (the host's resolver). */
export function hostResolver(): string {
  const conf = readFileSync("/etc/resolv.conf", "utf8");
  for (const m of conf.matchAll(/^\s*nameserver\s+(\S+)/gm)) if (isIPv4(m[1]!)) return m[1]!;
  return "127.0.0.1";
}

/** The resolver the DNS filters forward to: COCOON_DNS_UPSTREAM ("a.b.c.d" or "a.b.c.d:port"), else the host's. */
export function dnsUpstream(env: NodeJS.ProcessEnv = process.env): string {
  return env.COCOON_DNS_UPSTREAM || hostResolver();
}

function parseUpstream(upstream: string): { address: string; port: number } {
  const [address, port = "53", extra] = upstream.split(":");
  if (extra !== undefined || !address || !isIPv4(address) || !/^\d{1,5}$/.test(port) || Number(port) < 1 || Number(port) > 65535) {
    throw new Error(`DNS upstream must be an IPv4 address with an optional :port (COCOON_DNS_UPSTREAM), got "${upstream}"`);
  }
  return { address, port: Number(port) };
}

/** Sends one query from a socket of its own (a fresh source port) connected to the upstream, so only its answers arrive. */
function forward(msg: Buffer, upstream: { address: string; port: number }): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const s = createSocket("udp4");
    const done = (err: Error | undefined, reply?: Buffer) => {
      clearTimeout(timer);
      s.close();
      if (err) reject(err);
      else resolve(reply!);
    };
    const timer = setTimeout(() => done(new Error(`upstream ${upstream.address} did not answer in ${DNS_LIMITS.upstreamTimeoutMs} ms`)), DNS_LIMITS.upstreamTimeoutMs);
    s.on("message", (reply) => {
      if (reply.length >= 12 && reply.readUInt16BE(0) === msg.readUInt16BE(0) && (reply[2]! & 0x80) !== 0) done(undefined, reply);
    });
    s.on("error", (err) => done(err));
    s.connect(upstream.port, upstream.address, () => s.send(msg));
  });
}

/**
 * What a datagram sent to the filter is: undefined when it is no query (too
 * short or long, a response): dropped; `{rcode}` when it is a query to answer
 * with an error (not a standard query, not exactly one question, a bad name);
 * otherwise the question's name as labels.
 */
export function parseQuery(msg: Buffer): undefined | { rcode: number } | { labels: string[] } {
  if (msg.length < 12 || msg.length > DNS_LIMITS.maxQueryBytes || (msg[2]! & 0x80) !== 0) return undefined;
  if (((msg[2]! >> 3) & 0x0f) !== 0) return { rcode: RCODE.NOTIMP }; // opcode: only QUERY
  // One question, no answer or authority records, at most one additional record (EDNS's OPT).
  if (msg.readUInt16BE(4) !== 1 || msg.readUInt16BE(6) !== 0 || msg.readUInt16BE(8) !== 0 || msg.readUInt16BE(10) > 1) return { rcode: RCODE.FORMERR };
  const q = readName(msg, 12);
  if (!q || q.end + 4 > msg.length) return { rcode: RCODE.FORMERR };
  return { labels: q.labels };
}

function errorReply(query: Buffer, rcode: number): Buffer {
  const q = query.readUInt16BE(4) === 1 ? readName(query, 12) : undefined;
  const question = q && q.end + 4 <= query.length ? q.end + 4 : undefined;
  const reply = Buffer.from(query.subarray(0, question ?? 12));
  reply[2] = (query[2]! & 0x79) | 0x80; // QR, keep opcode and RD
  reply[3] = 0x80 | rcode; // RA
  reply.writeUInt16BE(question ? 1 : 0, 4);
  reply.fill(0, 6, 12); // no answer, authority or additional records
  return reply;
}

/**
 * Reads a (possibly compressed) name at `offset` (RFC 1035 4.1.4): at most
 * 255 octets; each pointer must point before the previous one (and before the
 * name itself), so a loop or a forward pointer ends the read; the extended
 * label types (0x40, 0x80) are refused. `end` is where the record continues.
 */
export function readName(buf: Buffer, offset: number): { labels: string[]; end: number } | undefined {
  const labels: string[] = [];
  let pos = offset;
  let limit = offset;
  let octets = 1; // the root label
  let end: number | undefined;
  for (;;) {
    if (pos >= buf.length) return undefined;
    const len = buf[pos]!;
    if (len === 0) return { labels, end: end ?? pos + 1 };
    if ((len & 0xc0) === 0xc0) {
      if (pos + 1 >= buf.length) return undefined;
      const target = ((len & 0x3f) << 8) | buf[pos + 1]!;
      if (target >= limit) return undefined;
      end ??= pos + 2;
      pos = limit = target;
      continue;
    }
    if ((len & 0xc0) !== 0) return undefined;
    octets += len + 1;
    if (octets > 255 || pos + 1 + len > buf.length) return undefined;
    labels.push(buf.toString("latin1", pos + 1, pos + 1 + len));
    pos += 1 + len;
  }
}

/** The A records of a response, with their smallest TTL; stops at the first record that does not parse. */
export function answersA(buf: Buffer): { ips: string[]; ttl: number } {
  const ips: string[] = [];
  let ttl = Infinity;
  if (buf.length < 12 || (buf[3]! & 0x0f) !== 0) return { ips, ttl: 0 };
  let pos = 12;
  for (let i = buf.readUInt16BE(4); i > 0; i--) {
    const q = readName(buf, pos);
    if (!q || q.end + 4 > buf.length) return { ips, ttl: 0 };
    pos = q.end + 4;
  }
  for (let i = buf.readUInt16BE(6); i > 0 && pos < buf.length; i--) {
    const r = readName(buf, pos);
    if (!r || r.end + 10 > buf.length) break;
    const type = buf.readUInt16BE(r.end);
    const rttl = buf.readUInt32BE(r.end + 4);
    const rdlen = buf.readUInt16BE(r.end + 8);
    const data = r.end + 10;
    if (data + rdlen > buf.length) break;
    if (type === 1 && rdlen === 4) {
      ips.push([...buf.subarray(data, data + 4)].join("."));
      ttl = Math.min(ttl, rttl);
    }
    pos = data + rdlen;
  }
  return { ips, ttl: ips.length ? ttl : 0 };
}
