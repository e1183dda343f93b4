import { execFileSync } from "node:child_process";
import { randomInt } from "node:crypto";
import { existsSync, readdirSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { MicroVm } from "../../src/vmm/engine.ts";
import { type Egress, InvalidEgressError } from "../../src/vmm/network/index.ts";
import { vmObjects } from "../../src/vmm/network/nft.ts";
import { passtDir } from "../../src/vmm/network/passt.ts";
import { isAlive, processArgv } from "../../src/util/process.ts";
import { fakeResolver, type FakeResolver } from "../support/dns-resolver.ts";
import { useEngine } from "../support/engine-fixture.ts";

const ctx = await useEngine();

/**
 * A test host of our own: a network namespace behind a veth pair, on private
 * /30s no route of this machine covers yet, with a TCP server on port 8080.
 * Nothing sent to it leaves this machine, even if a block failed.
 */
const NS_PREFIX = "cocoon-t";
const NS = `${NS_PREFIX}${process.pid}`;
const VETH = `ct${process.pid}`;
const sh = (cmd: string) => execFileSync("bash", ["-c", cmd], { encoding: "utf8" });

/** Namespaces and veths of earlier runs that died before their cleanup (their routes would shadow ours). */
function removeLeftoverTestHosts(): void {
  for (const name of sh("ip netns list").split("\n").map((l) => l.split(" ")[0]!)) {
    const pid = Number(name.slice(NS_PREFIX.length));
    if (name.startsWith(NS_PREFIX) && pid > 0 && !isAlive(pid)) sh(`ip link del ct${pid}h 2>/dev/null || true; ip netns del ${name}`);
  }
}

/** The route this machine would take to `ip`, or undefined when it has none. */
function routeTo(ip: string): { dev: string; gateway?: string } | undefined {
  try {
    return (JSON.parse(sh(`ip -4 -j route get ${ip} 2>/dev/null`)) as { dev: string; gateway?: string }[])[0];
  } catch {
    return undefined;
  }
}
/** A subnet is ours to take when no route but a gateway's (the default) covers it. */
function unrouted(ip: string): boolean {
  const route = routeTo(ip);
  return route === undefined || route.gateway !== undefined;
}

function pickTestHost(): { ip: string; ip192: string; port: number } {
  for (let tries = 0; tries < 50; tries++) {
    const n = 1 + randomInt(254);
    const host = { ip: `10.213.${n}.2`, ip192: `192.168.${n}.2`, port: 8080 };
    if (unrouted(host.ip) && unrouted(host.ip192)) return host;
  }
  throw new Error("no free 10.213.x.0/30 and 192.168.x.0/30 pair for the test host: this machine routes them all");
}

removeLeftoverTestHosts();
const TESTHOST = pickTestHost();
const hostSide = (ip: string) => ip.replace(/\.2$/, ".1");
/** The test host's 10.x /30: the operator's COCOON_EGRESS_PRIVATE_ALLOW where a case opens it. */
const TESTHOST_NET = `${TESTHOST.ip.replace(/\.2$/, ".0")}/30`;

/** The operator's settings a VM's network is built with (read when its rules are installed); unset after each test. */
function operatorSettings(s: { privateAllow?: string; dnsUpstream?: string }): void {
  for (const [name, value] of [["COCOON_EGRESS_PRIVATE_ALLOW", s.privateAllow], ["COCOON_DNS_UPSTREAM", s.dnsUpstream]] as const) {
    if (value === undefined) delete process.env[name];
    else process.env[name] = value;
  }
}
afterEach(() => operatorSettings({}));

let loopbackServer: Server;
let hostAddrServer: Server;
let hostIp: string;
let nsServerPid: number;
/** Stands in for the host's resolver where a case needs names that resolve to the test host, the host or the metadata address. */
let resolver: FakeResolver;

function tcpServer(host: string): Promise<Server> {
  return new Promise((resolve) => {
    const s = createServer((c) => c.end("host-secret\n"));
    s.listen(0, host, () => resolve(s));
  });
}
const portOf = (s: Server) => (s.address() as { port: number }).port;

/** The test host's greeting as the host itself gets it, or the error. */
function greetingFromHost(ip: string): string {
  try {
    return sh(`timeout 2 bash -c 'exec 3<>/dev/tcp/${ip}/${TESTHOST.port} && head -1 <&3' 2>&1`).trim();
  } catch (err) {
    return (err as { stdout?: string }).stdout?.trim() || (err as Error).message;
  }
}

beforeAll(async () => {
  sh(`ip netns add ${NS}
      ip link add ${VETH}h type veth peer name ${VETH}n
      ip link set ${VETH}n netns ${NS}
      ip addr add ${hostSide(TESTHOST.ip)}/30 dev ${VETH}h && ip addr add ${hostSide(TESTHOST.ip192)}/30 dev ${VETH}h && ip link set ${VETH}h up
      ip -n ${NS} addr add ${TESTHOST.ip}/30 dev ${VETH}n && ip -n ${NS} addr add ${TESTHOST.ip192}/30 dev ${VETH}n
      ip -n ${NS} link set ${VETH}n up && ip -n ${NS} link set lo up`);
  const server = `require("net").createServer((c) => c.end("hello from the test host\\n")).listen(${TESTHOST.port}, "0.0.0.0")`;
  nsServerPid = Number(sh(`ip netns exec ${NS} setsid node -e '${server}' >/dev/null 2>&1 & echo $!`).trim());
  hostIp = (JSON.parse(sh("ip -4 -j addr show scope global")) as { addr_info: { local: string }[] }[])[0]!.addr_info[0]!.local;
  resolver = await fakeResolver((name) => {
    const ip = { "metadata.test": "169.254.169.254", "host.test": hostIp, "private.test": TESTHOST.ip, "private192.test": TESTHOST.ip192 }[name];
    return ip ? { ips: [ip] } : undefined;
  });
  loopbackServer = await tcpServer("127.0.0.1");
  hostAddrServer = await tcpServer(hostIp);
  // The host must reach the test host before any VM is asked to: a failure here is the fixture's, not the policy's.
  let greeting = "";
  for (let i = 0; i < 100 && greeting !== "hello from the test host"; i++) {
    greeting = greetingFromHost(TESTHOST.ip);
    if (greeting !== "hello from the test host") await new Promise((r) => setTimeout(r, 100));
  }
  if (greeting !== "hello from the test host") {
    throw new Error(`the test host ${TESTHOST.ip}:${TESTHOST.port} does not answer the host (${greeting}); routes:\n${sh("ip -4 route")}`);
  }
  expect(routeTo(TESTHOST.ip)?.dev).toBe(`${VETH}h`);
});

afterAll(() => {
  resolver?.close();
  loopbackServer?.close();
  hostAddrServer?.close();
  if (nsServerPid) sh(`kill ${nsServerPid} 2>/dev/null || true`);
  sh(`ip link del ${VETH}h 2>/dev/null || true; ip netns del ${NS} 2>/dev/null || true`);
});

/** Tries every destination at once from inside the guest; returns "<label>: ok <first line>" or "<label>: rc=<n> <error>". */
async function attempts(vm: MicroVm, targets: Record<string, string>): Promise<Record<string, string>> {
  const script = Object.entries(targets)
    .map(
      ([label, hostPort]) =>
        `( out=$(timeout 3 bash -c 'exec 3<>/dev/tcp/${hostPort.replace(":", "/")} && printf "GET / HTTP/1.1\\r\\nHost: ${hostPort.split(":")[0]}\\r\\nConnection: close\\r\\n\\r\\n" >&3 && head -1 <&3' 2>&1); rc=$?; ` +
        `[ $rc = 124 ] && out="connect timed out after 3 s (dropped on the host)"; echo "${label}|$rc|$(echo "$out" | tail -1)" ) &`,
    )
    .join("\n");
  const r = await vm.agent.exec({ command: ["bash", "-c", `${script}\nwait`], timeoutMs: 30_000 });
  const results: Record<string, string> = {};
  for (const line of r.stdout.trim().split("\n")) {
    const [label, rc, msg] = line.split("|");
    results[label!] = rc === "0" ? `ok ${msg?.trim()}` : `rc=${rc} ${msg}`;
  }
  return results;
}

async function blockedTargets(): Promise<Record<string, string>> {
  const other = await ctx.engine.launch(ctx.snapshot); // another VM: its forwarded agent port on the host's loopback
  return {
    // 127.0.0.1 is the guest's own loopback; the host's is tried through the gateway and the host's address.
    "host loopback server via gateway": `10.0.2.2:${portOf(loopbackServer)}`,
    "host address server": `${hostIp}:${portOf(hostAddrServer)}`,
    "metadata 169.254.169.254": "169.254.169.254:80",
    "another VM's forwarded port via gateway": `10.0.2.2:${other.record.agentPort}`,
    "another VM's forwarded port via host address": `${hostIp}:${other.record.agentPort}`,
    "private 10.x test host": `${TESTHOST.ip}:${TESTHOST.port}`,
    "private 192.168.x test host": `${TESTHOST.ip192}:${TESTHOST.port}`,
  };
}

function expectBlocked(mode: string, results: Record<string, string>, labels: string[]): void {
  for (const label of labels) {
    console.log(`[${mode}] ${label}: ${results[label]}`);
    expect(results[label], label).not.toMatch(/^ok/);
  }
}

/** Nothing of the VM's network is left on the host. */
function expectNoNetworkLeft(uid: number): Promise<void> {
  const passts = readdirSync("/proc")
    .filter((n) => /^\d+$/.test(n))
    .map(Number)
    .filter((pid) => isAlive(pid) && processArgv(pid)?.[0]?.includes("passt") && processArgv(pid)?.includes(String(uid)));
  expect(passts).toEqual([]);
  expect(existsSync(passtDir(uid))).toBe(false);
  return vmObjects(uid).then((objs) => expect(objs).toEqual([]));
}

const launch = (egress: Egress) => ctx.engine.launch(ctx.snapshot, { egress });

describe("egress policy", () => {
  it('"none": nothing leaves the VM', async () => {
    const vm = await launch("none");
    const targets = await blockedTargets();
    const results = await attempts(vm, { ...targets, "internet deb.debian.org": "deb.debian.org:80" });
    expectBlocked("none", results, [...Object.keys(targets), "internet deb.debian.org"]);
  });

  it('"internet": a public mirror works, the host, private, link-local and other VMs do not, even a private range the operator opened', async () => {
    operatorSettings({ privateAllow: TESTHOST_NET }); // opens it to allow lists only
    const vm = await launch("internet");
    const targets = await blockedTargets();
    const results = await attempts(vm, { ...targets, mirror: "deb.debian.org:80" });
    console.log(`[internet] deb.debian.org:80: ${results.mirror}`);
    expect(results.mirror).toMatch(/^ok HTTP\/1\.1/);
    expectBlocked("internet", results, Object.keys(targets));
  });

  it("allow list: an allowed CIDR (inside the operator's COCOON_EGRESS_PRIVATE_ALLOW) and domain work, everything else does not, names are checked when connecting", async () => {
    operatorSettings({ privateAllow: TESTHOST_NET });
    const vm = await launch({ allow: [`${TESTHOST.ip}/32`, "deb.debian.org"] });
    const targets = await blockedTargets();
    const results = await attempts(vm, { ...targets, cidr: `${TESTHOST.ip}:${TESTHOST.port}`, domain: "deb.debian.org:80" });
    delete targets["private 10.x test host"]; // named by the allow list
    console.log(`[allow] ${TESTHOST.ip}:${TESTHOST.port}: ${results.cidr}\n[allow] deb.debian.org:80: ${results.domain}`);
    expect(results.cidr).toBe("ok hello from the test host");
    expect(results.domain).toMatch(/^ok HTTP\/1\.1/);
    expectBlocked("allow", results, Object.keys(targets));
    // A name outside the list is refused by the VM's resolver; no query leaves the host.
    const other = await vm.agent.exec({ command: "getent hosts security.debian.org; echo rc=$?" });
    console.log(`[allow] getent hosts security.debian.org: ${other.stdout.trim()}`);
    expect(other.stdout.trim()).toBe("rc=2");
  });

  it("allow list by name only: the address is opened by resolving an allowed name, not by knowing it", async () => {
    const vm = await launch({ allow: ["*.debian.org"] });
    const ip = (await vm.agent.exec({ command: "getent hosts debian.org; echo rc=$?" })).stdout.trim();
    expect(ip).toBe("rc=2"); // "*.debian.org" covers names under debian.org, not debian.org itself
    const mirrorIp = sh("getent ahostsv4 deb.debian.org | head -1 | cut -d' ' -f1").trim();
    const before = await attempts(vm, { direct: `${mirrorIp}:80` });
    console.log(`[allow *.debian.org] ${mirrorIp}:80 before any lookup: ${before.direct}`);
    expect(before.direct).not.toMatch(/^ok/);
    expect((await vm.agent.exec({ command: "getent hosts deb.debian.org" })).exitCode).toBe(0);
    const after = await attempts(vm, { direct: `${mirrorIp}:80` });
    expect(after.direct).toMatch(/^ok HTTP\/1\.1/);
  });

  it("rejects an invalid policy before starting anything", async () => {
    await expect(launch({ allow: ["not a host"] })).rejects.toThrow(InvalidEgressError);
    await expect(launch("everything" as Egress)).rejects.toThrow(InvalidEgressError);
  });
});

describe("egress floors", () => {
  const field = (allow: string[]) => launch({ allow }).then(() => "launched", (err: InvalidEgressError) => `${err.field}: ${err.message}`);

  it("an allow list cannot name a floor, 0.0.0.0/0, or a private range the operator did not open", async () => {
    expect(await field(["deb.debian.org", "169.254.169.254"])).toMatch(/^network\.egress\.allow\[1\]: .*link-local, cloud metadata/);
    expect(await field(["0.0.0.0/0"])).toMatch(/^network\.egress\.allow\[0\]: .*use "internet"/);
    expect(await field([`${hostIp}/32`])).toMatch(/^network\.egress\.allow\[0\]: .*an address of the host/);
    expect(await field(["127.0.0.1"])).toMatch(/loopback/);
    expect(await field([TESTHOST.ip])).toMatch(/^network\.egress\.allow\[0\]: .*COCOON_EGRESS_PRIVATE_ALLOW/);
    operatorSettings({ privateAllow: TESTHOST_NET });
    expect(await field([TESTHOST.ip192])).toMatch(/COCOON_EGRESS_PRIVATE_ALLOW/); // outside the operator's range
    expect(await field([TESTHOST_NET])).toMatch(/an address of the host/); // the /30 holds the host's end of the link
    expect(ctx.engine.list()).toEqual([]);
  });

  it("names that resolve to the metadata address, the host or a private range open nothing; the operator's range opens by name", async () => {
    operatorSettings({ dnsUpstream: resolver.upstream });
    const closed = await launch({ allow: ["metadata.test", "host.test", "private.test", "private192.test"] });
    const names = await closed.agent.exec({ command: "for n in metadata host private private192; do getent hosts $n.test || echo $n: rc=$?; done" });
    console.log(`[floors] the guest resolves:\n${names.stdout.trim()}`);
    // Answered: the names resolve, the addresses stay closed.
    expect(names.stdout).toMatch(/^169\.254\.169\.254\s+metadata\.test$/m);
    expect(names.stdout).toMatch(new RegExp(`^${TESTHOST.ip.replace(/\./g, "\\.")}\\s+private\\.test$`, "m"));
    const results = await attempts(closed, {
      "metadata by name": "metadata.test:80",
      "host address by name": `host.test:${portOf(hostAddrServer)}`,
      "private 10.x by name": `private.test:${TESTHOST.port}`,
      "private 192.168.x by name": `private192.test:${TESTHOST.port}`,
      "private 10.x by address": `${TESTHOST.ip}:${TESTHOST.port}`,
    });
    expectBlocked("floors", results, Object.keys(results));
    const set = sh(`nft list set inet cocoon dns_${closed.record.network!.uid}`);
    for (const ip of ["169.254.169.254", hostIp, TESTHOST.ip, TESTHOST.ip192]) expect(set).not.toContain(ip); // never written to the VM's set

    operatorSettings({ dnsUpstream: resolver.upstream, privateAllow: TESTHOST_NET });
    const opened = await launch({ allow: ["private.test", "private192.test", "metadata.test"] });
    const reach = await attempts(opened, { "10.x by name": `private.test:${TESTHOST.port}`, "192.168.x by name": `private192.test:${TESTHOST.port}`, metadata: "metadata.test:80" });
    console.log(`[floors, operator opens ${TESTHOST_NET}] ${JSON.stringify(reach)}`);
    expect(reach["10.x by name"]).toBe("ok hello from the test host");
    expectBlocked("floors, operator range", reach, ["192.168.x by name", "metadata"]);
  });
});

describe("egress across the VM's life", () => {
  it("clones keep the same guest address, each with its own policy; suspend, resume and a server restart keep it; terminate leaves nothing", async () => {
    operatorSettings({ privateAllow: TESTHOST_NET });
    const [a, b] = await Promise.all([launch({ allow: [`${TESTHOST.ip}/32`] }), launch("internet")]);
    const ids = await Promise.all([a!, b!].map((vm) => vm.agent.exec({ command: "cat /sys/class/net/eth0/address; ip -4 -o addr show eth0 2>/dev/null | awk '{print $4}' || true" })));
    expect(ids[0]!.stdout).toBe(ids[1]!.stdout);
    expect(ids[0]!.stdout).toContain("52:54:00:c0:c0:01");
    const check = async (vm: MicroVm) => attempts(vm, { testhost: `${TESTHOST.ip}:${TESTHOST.port}`, mirror: "deb.debian.org:80" });
    expect(await check(a!)).toMatchObject({ testhost: "ok hello from the test host", mirror: expect.not.stringMatching(/^ok/) as unknown });
    expect((await check(b!)).testhost).not.toMatch(/^ok/);

    const uid = a!.record.network!.uid!;
    await ctx.engine.suspend(a!.id);
    await expectNoNetworkLeft(uid); // a suspended VM holds no process, rules or resolver
    await ctx.engine.resume(a!.id);
    expect(a!.record.network!.uid).toBe(uid);
    expect((await check(a!)).testhost).toBe("ok hello from the test host");

    const engine = await ctx.reopen(); // a restarted server re-adopts the VM and recreates its resolver
    const readopted = engine.get(b!.id);
    expect((await attempts(readopted, { mirror: "deb.debian.org:80" })).mirror).toMatch(/^ok HTTP\/1\.1/);

    const uids = [uid, b!.record.network!.uid!];
    for (const vm of engine.list()) await engine.terminate(vm.id);
    for (const u of uids) await expectNoNetworkLeft(u);
  });
});
