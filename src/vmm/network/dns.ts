import { createSocket, type Socket } from "node:dgram";
import { readFileSync } from "node:fs";
import { isIPv4 } from "node:net";

/**
 * A VM's DNS resolver on the host (127.0.0.1, UDP). The guest's 10.0.2.3:53 is
 * DNAT-ed here by nftables. It forwards allowed questions to the host's
 * resolver; for an allow list, names outside it get REFUSED without any query
 * leaving the host, and the IPv4 answers to allowed names are handed to
 * `onResolved` (which opens them in the VM's nftables set) before the guest
 * sees the answer.
 */
export interface DnsFilterOpts {
  /** undefined: every name is allowed (internet mode). */
  allowName?: (qname: string) => boolean;
  onResolved?: (ips: string[], ttlSeconds: number) => Promise<void>;
  upstream?: string;
  log?: (msg: string) => void;
}

export class DnsFilter {
  private constructor(
    private readonly socket: Socket,
    readonly port: number,
  ) {}

  static async start(opts: DnsFilterOpts, port = 0): Promise<DnsFilter> {
    const socket = createSocket("udp4");
    await new Promise<void>((resolve, reject) => {
      socket.once("error", reject);
      socket.bind(port, "127.0.0.1", () => {
        socket.off("error", reject);
        resolve();
      });
    });
    const upstream = opts.upstream ?? hostResolver();
    socket.on("message", (msg, from) => {
      void handle(msg, opts, upstream).then(
        (reply) => reply && socket.send(reply, from.port, from.address),
        (err: Error) => opts.log?.(`dns: ${err.message}`),
      );
    });
    socket.on("error", (err) => opts.log?.(`dns socket: ${err.message}`));
    return new DnsFilter(socket, socket.address().port);
  }

  close(): void {
    try {
      this.socket.close();
    } catch {
      // already closed
    }
  }
}

/** First IPv4 nameserver of /etc/resolv.conf (the host's resolver). */
export function hostResolver(): string {
  const conf = readFileSync("/etc/resolv.conf", "utf8");
  for (const m of conf.matchAll(/^\s*nameserver\s+(\S+)/gm)) if (isIPv4(m[1]!)) return m[1]!;
  return "127.0.0.1";
}

async function handle(msg: Buffer, opts: DnsFilterOpts, upstream: string): Promise<Buffer | undefined> {
  if (msg.length < 12 || (msg[2]! & 0x80) !== 0) return undefined; // not a query
  const q = readName(msg, 12);
  if (!q || msg.readUInt16BE(4) !== 1) return errorReply(msg, 1); // FORMERR: exactly one question
  if (opts.allowName && !opts.allowName(q.name)) return errorReply(msg, 5); // REFUSED
  const reply = await forward(msg, upstream);
  if (opts.onResolved) {
    const { ips, ttl } = answersA(reply);
    // Clamped: a tiny TTL must not break a connect that follows the lookup, a huge one must not keep an address open for days.
    await opts.onResolved(ips, Math.min(Math.max(ttl, 60), 3600));
  }
  return reply;
}

function forward(msg: Buffer, upstream: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const s = createSocket("udp4");
    const timer = setTimeout(() => {
      s.close();
      reject(new Error(`upstream ${upstream} did not answer`));
    }, 4000);
    s.on("message", (reply) => {
      if (reply.length < 2 || reply.readUInt16BE(0) !== msg.readUInt16BE(0)) return;
      clearTimeout(timer);
      s.close();
      resolve(reply);
    });
    s.on("error", (err) => {
      clearTimeout(timer);
      s.close();
      reject(err);
    });
    s.send(msg, 53, upstream);
  });
}

function errorReply(query: Buffer, rcode: number): Buffer {
  const q = readName(query, 12);
  const end = q ? Math.min(q.end + 4, query.length) : 12;
  const reply = Buffer.from(query.subarray(0, end));
  reply[2] = (query[2]! & 0x79) | 0x80; // QR, keep opcode and RD
  reply[3] = 0x80 | rcode; // RA
  reply.writeUInt16BE(q ? 1 : 0, 4);
  reply.fill(0, 6, 12); // no answer, authority or additional records
  return reply;
}

/** Reads a (possibly compressed) name at `offset`; `end` is where the record continues. */
function readName(buf: Buffer, offset: number): { name: string; end: number } | undefined {
  const labels: string[] = [];
  let pos = offset;
  let end: number | undefined;
  for (let hops = 0; hops < 64; hops++) {
    if (pos >= buf.length) return undefined;
    const len = buf[pos]!;
    if (len === 0) return { name: labels.join("."), end: end ?? pos + 1 };
    if ((len & 0xc0) === 0xc0) {
      if (pos + 1 >= buf.length) return undefined;
      end ??= pos + 2;
      pos = ((len & 0x3f) << 8) | buf[pos + 1]!;
      continue;
    }
    if (pos + 1 + len > buf.length) return undefined;
    labels.push(buf.toString("latin1", pos + 1, pos + 1 + len));
    pos += 1 + len;
  }
  return undefined;
}

/** The A records of a response, with their smallest TTL. */
export function answersA(buf: Buffer): { ips: string[]; ttl: number } {
  const ips: string[] = [];
  let ttl = Infinity;
  if (buf.length < 12 || (buf[3]! & 0x0f) !== 0) return { ips, ttl: 0 };
  let pos = 12;
  for (let i = buf.readUInt16BE(4); i > 0; i--) {
    const q = readName(buf, pos);
    if (!q) return { ips, ttl: 0 };
    pos = q.end + 4;
  }
  for (let i = buf.readUInt16BE(6); i > 0; i--) {
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
