import { createSocket } from "node:dgram";

/**
 * A stand-in for the host's DNS resolver (a third party) on 127.0.0.1: it
 * answers A questions from `answer`, holding each answer `delayMs`, and
 * counts how many questions it holds at once. Names it does not know get
 * NXDOMAIN; other types an empty NOERROR.
 */
export interface FakeResolver {
  /** "127.0.0.1:port", for COCOON_DNS_UPSTREAM or DnsFilterOpts.upstream. */
  upstream: string;
  stats: { received: number; maxHeld: number };
  close(): void;
}

export async function fakeResolver(answer: (name: string) => { ips: string[]; ttl?: number } | undefined, delayMs = 0): Promise<FakeResolver> {
  const socket = createSocket("udp4");
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
  const stats = { received: 0, maxHeld: 0 };
  let held = 0;
  socket.on("message", (query, from) => {
    stats.received++;
    held++;
    stats.maxHeld = Math.max(stats.maxHeld, held);
    setTimeout(() => {
      held--;
      socket.send(reply(query, answer), from.port, from.address, () => undefined);
    }, delayMs);
  });
  return { upstream: `127.0.0.1:${(socket.address() as { port: number }).port}`, stats, close: () => socket.close() };
}

/** The question's name, read without compression (what a stub resolver sends). */
function questionName(query: Buffer): { name: string; end: number } {
  const labels: string[] = [];
  let pos = 12;
  while (query[pos]! > 0) {
    labels.push(query.toString("latin1", pos + 1, pos + 1 + query[pos]!));
    pos += 1 + query[pos]!;
  }
  return { name: labels.join(".").toLowerCase(), end: pos + 1 };
}

function reply(query: Buffer, answer: (name: string) => { ips: string[]; ttl?: number } | undefined): Buffer {
  const q = questionName(query);
  const type = query.readUInt16BE(q.end);
  const found = answer(q.name);
  const ips = found && type === 1 ? found.ips : [];
  const header = Buffer.alloc(12);
  header.writeUInt16BE(query.readUInt16BE(0), 0);
  header.writeUInt16BE(0x8180 | (found ? 0 : 3), 2); // QR RD RA; NXDOMAIN for an unknown name
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(ips.length, 6);
  const records = ips.map((ip) => {
    const r = Buffer.alloc(16);
    r.writeUInt16BE(0xc00c, 0); // the question's name
    r.writeUInt16BE(1, 2); // A
    r.writeUInt16BE(1, 4); // IN
    r.writeUInt32BE(found?.ttl ?? 300, 6);
    r.writeUInt16BE(4, 10);
    ip.split(".").forEach((o, i) => (r[12 + i] = Number(o)));
    return r;
  });
  return Buffer.concat([header, query.subarray(12, q.end + 4), ...records]);
}

/** A standard query for `name` (type A unless told), as a stub resolver sends it. */
export function dnsQuery(name: string, id: number, type = 1): Buffer {
  const labels = name.split(".").map((l) => Buffer.concat([Buffer.from([l.length]), Buffer.from(l, "latin1")]));
  const header = Buffer.alloc(12);
  header.writeUInt16BE(id, 0);
  header.writeUInt16BE(0x0100, 2); // RD
  header.writeUInt16BE(1, 4);
  const tail = Buffer.alloc(5);
  tail.writeUInt16BE(type, 1);
  tail.writeUInt16BE(1, 3);
  return Buffer.concat([header, ...labels, tail]);
}
