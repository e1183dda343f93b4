import { execFileSync } from "node:child_process";
import { createSocket, type Socket } from "node:dgram";
import { readdirSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseCidr } from "../../src/vmm/network/addresses.ts";
import { answersA, DnsBudget, DnsFilter, DNS_LIMITS, parseQuery, readName } from "../../src/vmm/network/dns.ts";
import { nft, ResolvedSet } from "../../src/vmm/network/nft.ts";
import { dnsQuery, fakeResolver, type FakeResolver } from "../support/dns-resolver.ts";

const header = (id: number, flags: number, qd: number, an = 0, ns = 0, ar = 0) => {
  const h = Buffer.alloc(12);
  [id, flags, qd, an, ns, ar].forEach((v, i) => h.writeUInt16BE(v, i * 2));
  return h;
};
const QTAIL = Buffer.from([0, 1, 0, 1]); // type A, class IN

/** A deterministic stream of bytes for fuzzing (xorshift32). */
function prng(seed: number) {
  let x = seed;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) & 0xff;
  };
}

describe("DNS parser against hostile packets", () => {
  it("refuses compression loops, forward pointers, truncated names, overlong names and unknown label types", () => {
    const self = Buffer.concat([header(1, 0x0100, 1), Buffer.from([0xc0, 12]), QTAIL]); // points at itself
    const forward = Buffer.concat([header(1, 0x0100, 1), Buffer.from([0xc0, 14, 1, 0x61, 0]), QTAIL]);
    // Two names pointing at each other: a at 12 → b at 16 → a.
    const mutual = Buffer.concat([header(1, 0, 0), Buffer.from([1, 0x61, 0xc0, 16, 1, 0x62, 0xc0, 12])]);
    const truncatedLabel = Buffer.concat([header(1, 0x0100, 1), Buffer.from([10, 0x61, 0x62])]);
    const noRoot = Buffer.concat([header(1, 0x0100, 1), Buffer.from([1, 0x61])]);
    const extended = Buffer.concat([header(1, 0x0100, 1), Buffer.from([0x41, 0x61, 0]), QTAIL]);
    const halfPointer = Buffer.concat([header(1, 0x0100, 1), Buffer.from([0xc0])]);
    for (const [what, buf] of Object.entries({ self, forward, truncatedLabel, noRoot, extended, halfPointer })) {
      expect(readName(buf, 12), what).toBeUndefined();
      expect(parseQuery(buf), what).toEqual({ rcode: 1 }); // FORMERR
    }
    expect(readName(mutual, 12)).toBeUndefined();
    expect(readName(mutual, 16)).toBeUndefined();
    // 127 one-letter labels are 255 octets with the root: the most a name may have; one more is refused.
    const labels = (n: number) => Buffer.concat([header(1, 0x0100, 1), ...Array.from({ length: n }, () => Buffer.from([1, 0x61])), Buffer.from([0]), QTAIL]);
    expect(readName(labels(127), 12)?.labels.length).toBe(127);
    expect(readName(labels(128), 12)).toBeUndefined();
    // A valid backwards pointer still works.
    const named = Buffer.concat([header(1, 0, 0), Buffer.from([3, 0x66, 0x6f, 0x6f, 0, 3, 0x62, 0x61, 0x72, 0xc0, 12])]);
    expect(readName(named, 17)).toEqual({ labels: ["bar", "foo"], end: 23 });
  });

  it("answers only standard queries with one question, and drops what is not a query", () => {
    const name = dnsQuery("a.example.org", 7).subarray(12);
    expect(parseQuery(Buffer.alloc(11))).toBeUndefined();
    expect(parseQuery(Buffer.concat([header(1, 0x8180, 1), name]))).toBeUndefined(); // a response
    expect(parseQuery(Buffer.alloc(DNS_LIMITS.maxQueryBytes + 1))).toBeUndefined();
    expect(parseQuery(Buffer.concat([header(1, 0x2800, 1), name]))).toEqual({ rcode: 4 }); // UPDATE: NOTIMP
    expect(parseQuery(Buffer.concat([header(1, 0x0100, 0), name]))).toEqual({ rcode: 1 });
    expect(parseQuery(Buffer.concat([header(1, 0x0100, 2), name, name]))).toEqual({ rcode: 1 });
    expect(parseQuery(Buffer.concat([header(1, 0x0100, 1, 0xffff), name]))).toEqual({ rcode: 1 }); // huge answer count
    expect(parseQuery(Buffer.concat([header(1, 0x0100, 1, 0, 0, 0xffff), name]))).toEqual({ rcode: 1 });
    expect(parseQuery(Buffer.concat([header(1, 0x0100, 1), name.subarray(0, name.length - 2)]))).toEqual({ rcode: 1 }); // type/class cut off
    expect(parseQuery(dnsQuery("a.example.org", 7))).toEqual({ labels: ["a", "example", "org"] });
  });

  it("reads A records from answers with huge counts, loops or truncation without throwing", () => {
    const q = dnsQuery("x.org", 1).subarray(12);
    const a = (ip: number[], nameBytes = [0xc0, 12]) => Buffer.from([...nameBytes, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, ...ip]);
    expect(answersA(Buffer.concat([header(1, 0x8180, 1, 2), q, a([1, 2, 3, 4]), a([5, 6, 7, 8])]))).toEqual({ ips: ["1.2.3.4", "5.6.7.8"], ttl: 60 });
    expect(answersA(Buffer.concat([header(1, 0x8180, 1, 0xffff), q, a([1, 2, 3, 4])]))).toEqual({ ips: ["1.2.3.4"], ttl: 60 });
    expect(answersA(Buffer.concat([header(1, 0x8180, 1, 1), q, a([1, 2, 3, 4]).subarray(0, 14)]))).toEqual({ ips: [], ttl: 0 });
    expect(answersA(Buffer.concat([header(1, 0x8180, 1, 1), q, a([1, 2, 3, 4], [0xc0, 0x30])]))).toEqual({ ips: [], ttl: 0 }); // forward pointer
    expect(answersA(Buffer.concat([header(1, 0x8180, 0xffff, 1), q]))).toEqual({ ips: [], ttl: 0 });
  });

  it("survives 50 000 random and mutated packets", () => {
    const next = prng(12345);
    const valid = Buffer.concat([header(1, 0x8180, 1, 1), dnsQuery("a.example.org", 1).subarray(12), Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 9, 9, 9, 9])]);
    for (let i = 0; i < 50_000; i++) {
      const buf = i % 2 ? Buffer.from(valid) : Buffer.alloc(next() % 80);
      for (let j = 0; j < (i % 2 ? 1 + (next() % 4) : buf.length); j++) buf[i % 2 ? next() % buf.length : j] = next();
      parseQuery(buf);
      answersA(buf);
      for (let off = 0; off < buf.length; off += 7) readName(buf, off);
    }
  });
});

/** Sends `queries` from one socket in bursts and collects every reply's id and rcode. */
async function flood(port: number, queries: Buffer[], settleMs: number): Promise<Map<number, number>> {
  const client: Socket = createSocket("udp4");
  await new Promise<void>((r) => client.bind(0, "127.0.0.1", r));
  const replies = new Map<number, number>();
  client.on("message", (msg) => replies.set(msg.readUInt16BE(0), msg[3]! & 0x0f));
  for (let i = 0; i < queries.length; i += 50) {
    for (const q of queries.slice(i, i + 50)) client.send(q, port, "127.0.0.1");
    await new Promise((r) => setImmediate(r));
  }
  await new Promise((r) => setTimeout(r, settleMs));
  client.close();
  return replies;
}

/** Sends `queries` keeping `window` unanswered at a time, as a busy stub resolver would; resolves when all are answered. */
async function paced(port: number, queries: Buffer[], window: number): Promise<Map<number, number>> {
  const client: Socket = createSocket("udp4");
  await new Promise<void>((r) => client.bind(0, "127.0.0.1", r));
  const replies = new Map<number, number>();
  let sent = 0;
  const sendNext = () => sent < queries.length && client.send(queries[sent++]!, port, "127.0.0.1");
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${replies.size} of ${queries.length} answered`)), 60_000);
    client.on("message", (msg) => {
      replies.set(msg.readUInt16BE(0), msg[3]! & 0x0f);
      if (replies.size === queries.length) {
        clearTimeout(timer);
        resolve();
      } else sendNext();
    });
    for (let i = 0; i < window; i++) sendNext();
  });
  client.close();
  return replies;
}

const openDescriptors = () => readdirSync("/proc/self/fd").length;

describe("DNS filter under a flood (real UDP on loopback, a stand-in upstream resolver)", () => {
  let upstream: FakeResolver;
  beforeAll(async () => {
    // Holds every answer 300 ms: a flood piles up in the filter, not in the resolver.
    upstream = await fakeResolver((name) => (name.endsWith(".flood.test") ? { ips: ["11.0.0.1"] } : undefined), 300);
  });
  afterAll(() => upstream.close());

  it("holds at most its per-VM limit of queries upstream and answers the excess SERVFAIL at once", async () => {
    const filter = await DnsFilter.start({ upstream: upstream.upstream });
    const before = openDescriptors();
    let peakDescriptors = before;
    const sampler = setInterval(() => (peakDescriptors = Math.max(peakDescriptors, openDescriptors())), 5);
    upstream.stats.maxHeld = 0;
    const replies = await flood(filter.port, Array.from({ length: 2000 }, (_, i) => dnsQuery(`n${i}.flood.test`, i)), 1000);
    clearInterval(sampler);
    filter.close();
    console.log(`[dns flood] ${JSON.stringify(filter.stats)}; upstream held at most ${upstream.stats.maxHeld}; descriptors ${before} → peak ${peakDescriptors}; replies ${replies.size}`);
    expect(upstream.stats.maxHeld).toBeLessThanOrEqual(DNS_LIMITS.inFlightPerVm);
    expect(upstream.stats.maxHeld).toBeGreaterThan(0);
    expect(peakDescriptors - before).toBeLessThanOrEqual(DNS_LIMITS.inFlightPerVm + 4); // one socket per query upstream, and a few of the sampler's
    expect(filter.stats.overloaded).toBeGreaterThan(1000);
    const rcodes = [...replies.values()];
    expect(rcodes.filter((r) => r === 0).length).toBe(filter.stats.forwarded - filter.stats.failed);
    expect(rcodes.every((r) => r === 0 || r === 2)).toBe(true); // an answer or SERVFAIL, nothing else
  });

  it("holds at most the shared budget over several VMs' filters", async () => {
    const budget = new DnsBudget(40);
    const filters = await Promise.all([1, 2, 3].map(() => DnsFilter.start({ upstream: upstream.upstream, budget })));
    upstream.stats.maxHeld = 0;
    await Promise.all(filters.map((f, k) => flood(f.port, Array.from({ length: 300 }, (_, i) => dnsQuery(`v${k}-${i}.flood.test`, i)), 1000)));
    for (const f of filters) f.close();
    expect(upstream.stats.maxHeld).toBeLessThanOrEqual(40);
    expect(budget.inFlight).toBe(0); // every slot given back
    expect(filters.reduce((n, f) => n + f.stats.overloaded, 0)).toBeGreaterThan(0);
  });

  it("closes with queries in flight (the VM suspended) without an error escaping", async () => {
    const filter = await DnsFilter.start({ upstream: upstream.upstream });
    const replies = flood(filter.port, Array.from({ length: 10 }, (_, i) => dnsQuery(`c${i}.flood.test`, i)), 600);
    await new Promise((r) => setTimeout(r, 100));
    filter.close(); // the upstream answers 200 ms later, to a closed filter
    expect((await replies).size).toBe(0);
    expect(filter.stats.forwarded).toBe(10);
  });

  it("answers hostile datagrams with FORMERR or not at all, refuses names outside the list and odd labels, and keeps serving", async () => {
    const filter = await DnsFilter.start({ upstream: upstream.upstream, allowName: (q) => q.endsWith(".flood.test") });
    const loop = Buffer.concat([header(77, 0x0100, 1), Buffer.from([0xc0, 12]), QTAIL]);
    const dotted = Buffer.concat([header(78, 0x0100, 1), Buffer.from([12, ...Buffer.from("x.flood.test"), 0]), QTAIL]); // one label holding dots
    const replies = await flood(filter.port, [loop, Buffer.from([1, 2, 3]), header(79, 0x8180, 1), dotted, dnsQuery("evil.example.org", 80), dnsQuery("ok.flood.test", 81)], 600);
    filter.close();
    expect(Object.fromEntries(replies)).toEqual({ 77: 1, 78: 5, 80: 5, 81: 0 });
    expect(filter.stats).toMatchObject({ forwarded: 1, refused: 2, malformed: 3 });
  });
});

describe("nftables writes of resolved addresses under a flood (real nft, a table of the test's own)", () => {
  const table = `inet cocoon_unit_${process.pid}`;
  const elements = () => {
    const set = JSON.parse(execFileSync("nft", ["-j", "list", "set", ...table.split(" "), "dns"], { encoding: "utf8" })) as { nftables: { set?: { elem?: unknown[] } }[] };
    return set.nftables.find((o) => o.set)?.set?.elem?.length ?? 0;
  };
  beforeAll(() => nft(`add table ${table}\nadd set ${table} dns { type ipv4_addr; flags timeout; size 4096; }`));
  afterAll(() => nft(`delete table ${table}`));

  it("batches thousands of answers into few nft processes, caps the set, and never opens a floor or a private address", async () => {
    let n = 0;
    const resolver = await fakeResolver((name) => {
      if (name === "meta.flood.test") return { ips: ["169.254.169.254", "127.0.0.1"] };
      if (name === "lan.flood.test") return { ips: ["10.213.1.1", "192.168.1.1"] };
      n++;
      return { ips: [`11.${(n >> 16) & 255}.${(n >> 8) & 255}.${n & 255}`], ttl: 600 };
    });
    const resolved = new ResolvedSet(`${table} dns`, { privateAllow: [parseCidr("10.213.0.0/16")!], maxElements: 256 });
    const filter = await DnsFilter.start({ upstream: resolver.upstream, allowName: () => true, onResolved: (ips, ttl) => resolved.add(ips, ttl) });
    const started = Date.now();
    await paced(filter.port, [dnsQuery("meta.flood.test", 60000), dnsQuery("lan.flood.test", 60001)], 2);
    const replies = await paced(filter.port, Array.from({ length: 3000 }, (_, i) => dnsQuery(`n${i}.flood.test`, i)), DNS_LIMITS.inFlightPerVm);
    const elapsedMs = Date.now() - started;
    filter.close();
    resolver.close();
    console.log(`[nft flood] ${JSON.stringify(resolved.stats)} in ${elapsedMs} ms; filter ${JSON.stringify(filter.stats)}; set elements ${elements()}`);
    expect(resolved.stats.nftRuns).toBeLessThanOrEqual(Math.ceil(elapsedMs / 100) + 1); // at most one per 100 ms (RESOLVED_LIMITS.minIntervalMs)
    expect(resolved.stats.nftRuns).toBeLessThan(resolved.stats.written / 4); // batched, not one per answer
    expect([...replies.values()].every((rcode) => rcode === 0)).toBe(true); // every name answered, opened or not
    expect(elements()).toBe(256);
    expect(resolved.stats.leftOutAtCap).toBeGreaterThan(0);
    const listed = execFileSync("nft", ["list", "set", ...table.split(" "), "dns"], { encoding: "utf8" });
    expect(listed).toContain("10.213.1.1"); // inside the operator's allowance
    for (const ip of ["169.254.169.254", "127.0.0.1", "192.168.1.1"]) expect(listed).not.toContain(ip);
    expect(resolved.stats.notPublic).toBe(3);
  });
});
