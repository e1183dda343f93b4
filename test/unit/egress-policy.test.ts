import { networkInterfaces } from "node:os";
import { describe, expect, it } from "vitest";
import { classifyAddress, covered, nftIntervals, parseCidr } from "../../src/vmm/network/addresses.ts";
import { egressPrivateAllow, InvalidEgressError, parseEgress, splitAllowList } from "../../src/vmm/network/policy.ts";

const cidrs = (...list: string[]) => list.map((c) => parseCidr(c)!);

/** The field and message parseEgress throws for `allow`, or "ok". */
function verdict(allow: string[], privateAllow = cidrs()): { field: string; message: string } | "ok" {
  try {
    parseEgress({ allow }, privateAllow);
    return "ok";
  } catch (err) {
    expect(err).toBeInstanceOf(InvalidEgressError);
    return { field: (err as InvalidEgressError).field, message: (err as Error).message };
  }
}

/** An IPv4 address of this host that is not loopback (the test machine has one). */
const hostIp = Object.values(networkInterfaces())
  .flat()
  .find((i) => i?.family === "IPv4" && !i.internal)!.address;

describe("address ranges", () => {
  it("parses and normalises IPv4 and IPv6 CIDRs, and refuses what is not one", () => {
    expect(parseCidr("10.1.2.3/8")?.text).toBe("10.0.0.0/8");
    expect(parseCidr("1.2.3.4")?.text).toBe("1.2.3.4/32");
    expect(parseCidr("fd00:1:2::5/48")?.text).toBe("fd00:1:2::/48");
    expect(parseCidr("::ffff:10.0.0.1")?.family).toBe(6);
    for (const bad of ["10.0.0.0/33", "1.2.3", "1.2.3.4/8/8", "::1/129", "fe80::1%eth0", "0x7f.0.0.1", "", "/8", "1.2.3.4/"]) expect(parseCidr(bad), bad).toBeUndefined();
  });

  it("classifies single addresses: floors, private, the host's own, public; IPv4-mapped IPv6 as its IPv4 address", () => {
    const kind = (ip: string) => classifyAddress(ip)?.kind ?? "public";
    expect(["127.0.0.1", "127.9.9.9", "169.254.169.254", "224.0.0.251", "255.255.255.255", "0.0.0.0", "::1", "fe80::1", "ff02::1", "::", "::ffff:127.0.0.1", "::ffff:169.254.169.254"].map(kind)).toEqual(Array(12).fill("floor"));
    expect(["10.0.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1", "0.1.2.3", "198.18.0.1", "fd00::1", "::ffff:10.0.0.1"].map(kind)).toEqual(Array(8).fill("private"));
    expect(["8.8.8.8", "151.101.2.132", "2a04:4e42::644", "172.32.0.1", "100.128.0.1"].map(kind)).toEqual(Array(5).fill("public"));
    expect(kind(hostIp)).toBe("floor");
    expect(classifyAddress("not an address")?.kind).toBe("floor");
  });

  it("checks that a range is covered by a union of others", () => {
    const [a, b] = cidrs("10.0.0.0/25", "10.0.0.128/25");
    const all = parseCidr("10.0.0.0/24")!;
    expect(covered(4, all.first, all.last, [b!, a!])).toBe(true);
    expect(covered(4, all.first, all.last, [a!])).toBe(false);
    expect(covered(4, all.first, all.last, cidrs("10.0.0.0/8"))).toBe(true);
  });

  it("merges ranges into nftables intervals that never overlap", () => {
    expect(nftIntervals(cidrs("10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8", "192.168.1.1", "fd00::/8"))).toEqual(["10.0.0.0-11.255.255.255", "192.168.1.1"]);
  });
});

describe("egress floors the tenant cannot lift", () => {
  it("refuses an allow entry overlapping a floor, naming the entry and the range", () => {
    const allow = ["deb.debian.org", "8.8.8.0/24", "1.1.1.1", "169.254.169.254"];
    expect(verdict(allow)).toEqual({ field: "network.egress.allow[3]", message: expect.stringContaining("169.254.0.0/16 (link-local, cloud metadata), which is never reachable") });
    for (const entry of ["127.0.0.1", "127.0.0.0/8", "224.0.0.1", "240.0.0.0/4", "255.255.255.255", "169.254.0.0/16", "0.0.0.0"]) {
      expect(verdict([entry]), entry).toMatchObject({ field: "network.egress.allow[0]", message: expect.stringContaining("never reachable") });
    }
  });

  it('refuses 0.0.0.0/0 (use "internet") and ranges that merely contain a floor', () => {
    expect(verdict(["pypi.org", "0.0.0.0/0"])).toEqual({ field: "network.egress.allow[1]", message: expect.stringContaining('use "internet"') });
    expect(verdict(["128.0.0.0/1"])).toMatchObject({ message: expect.stringContaining("169.254.0.0/16") });
    expect(verdict(["8.0.0.0/6"])).toMatchObject({ message: expect.stringContaining("10.0.0.0/8 (private)") });
  });

  it("refuses the host's own addresses without echoing them", () => {
    const v = verdict([`${hostIp}/32`]);
    expect(v).toMatchObject({ field: "network.egress.allow[0]", message: expect.stringContaining("an address of the host, which is never reachable") });
    expect((v as { message: string }).message.replace(`${hostIp}/32`, "")).not.toContain(hostIp);
  });

  it("opens private ranges only inside the operator's allowance, never a floor", () => {
    for (const entry of ["10.1.2.0/24", "172.16.5.5", "192.168.0.0/16", "100.64.0.1", "0.1.0.0/16", "198.18.0.1"]) {
      expect(verdict([entry]), entry).toMatchObject({ field: "network.egress.allow[0]", message: expect.stringContaining("COCOON_EGRESS_PRIVATE_ALLOW") });
    }
    const operator = cidrs("10.1.0.0/16", "192.168.7.0/24");
    expect(verdict(["10.1.2.0/24", "10.1.0.0/16", "192.168.7.9"], operator)).toBe("ok");
    expect(verdict(["10.0.0.0/8"], operator)).toMatchObject({ message: expect.stringContaining("not opened") }); // only partly inside
    expect(verdict(["10.1.2.3", "192.168.8.1"], operator)).toMatchObject({ field: "network.egress.allow[1]" });
  });

  it("keeps the rest of the syntax checks, each naming its entry", () => {
    expect(verdict(["pypi.org", "*.debian.org", "151.101.0.0/16"])).toBe("ok");
    expect(verdict(["pypi.org", "not a host"])).toMatchObject({ field: "network.egress.allow[1]" });
    expect(() => parseEgress({ allow: ["a.org", 5] }, [])).toThrow(expect.objectContaining({ field: "network.egress.allow[1]" }) as Error);
    expect(() => parseEgress("everything", [])).toThrow(InvalidEgressError);
    expect(splitAllowList(["Pypi.org.", "*.debian.org", "10.1.2.3/16"])).toEqual({ cidrs: ["10.1.0.0/16"], names: ["pypi.org"], suffixes: ["debian.org"] });
  });

  it("reads the operator's allowance from COCOON_EGRESS_PRIVATE_ALLOW and refuses a floor or IPv6 there", () => {
    expect(egressPrivateAllow({}).length).toBe(0);
    expect(egressPrivateAllow({ COCOON_EGRESS_PRIVATE_ALLOW: " 10.0.0.0/8, 192.168.5.1/24 " }).map((c) => c.text)).toEqual(["10.0.0.0/8", "192.168.5.0/24"]);
    expect(() => egressPrivateAllow({ COCOON_EGRESS_PRIVATE_ALLOW: "10.0.0.0/8,169.254.169.254" })).toThrow("COCOON_EGRESS_PRIVATE_ALLOW: 169.254.169.254/32 overlaps 169.254.0.0/16 (link-local, cloud metadata), which no setting opens");
    expect(() => egressPrivateAllow({ COCOON_EGRESS_PRIVATE_ALLOW: "0.0.0.0/0" })).toThrow("which no setting opens");
    expect(() => egressPrivateAllow({ COCOON_EGRESS_PRIVATE_ALLOW: "fc00::/7" })).toThrow("only IPv4 ranges apply here");
    expect(() => egressPrivateAllow({ COCOON_EGRESS_PRIVATE_ALLOW: "lan" })).toThrow('COCOON_EGRESS_PRIVATE_ALLOW: "lan" is not a CIDR');
  });
});
