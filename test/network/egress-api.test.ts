import { afterEach, describe, expect, it } from "vitest";
import { useApi } from "../support/api-fixture.ts";

// The egress floors as a tenant meets them: a 400 naming the allow-list entry,
// before any VM is admitted or started (test/network/egress.test.ts proves the
// floors from inside guests).

const api = await useApi();
const alice = await api.tenantKey("alice", ["microvm:*"]);
afterEach(() => {
  delete process.env.COCOON_EGRESS_PRIVATE_ALLOW;
});

const create = (allow: unknown[]) => api.call("POST", "/v1/microvms", { key: alice, body: { image: "base", network: { egress: { allow } } } });

describe("network.egress floors over the API", () => {
  it("refuses a floor, 0.0.0.0/0 and a private range the operator did not open with a 400 naming the entry", async () => {
    const cases: [unknown[], string, string][] = [
      [["pypi.org", "*.debian.org", "151.101.0.0/16", "169.254.169.254"], "network.egress.allow[3]", "169.254.0.0/16 (link-local, cloud metadata), which is never reachable"],
      [["0.0.0.0/0"], "network.egress.allow[0]", 'use "internet"'],
      [["pypi.org", "127.0.0.1"], "network.egress.allow[1]", "loopback"],
      [["10.20.0.0/16"], "network.egress.allow[0]", "10.0.0.0/8 (private), which the operator has not opened (COCOON_EGRESS_PRIVATE_ALLOW)"],
      [["pypi.org", "not a host"], "network.egress.allow[1]", "is not an IPv4 address, CIDR, domain name or *.domain wildcard"],
    ];
    for (const [allow, field, message] of cases) {
      const res = await create(allow);
      expect(res.status, res.text).toBe(400);
      expect(res.body.error).toMatchObject({ code: "ValidationError", details: { field } });
      expect(res.body.error.message).toContain(message);
    }
    process.env.COCOON_EGRESS_PRIVATE_ALLOW = "10.20.0.0/16";
    const wider = await create(["10.0.0.0/8"]); // inside 10/8, but only 10.20/16 is opened
    expect(wider.body.error?.details).toEqual({ field: "network.egress.allow[0]" });
    expect((await api.call("GET", "/v1/microvms", { key: alice })).body.microVms).toEqual([]);
  });
});
