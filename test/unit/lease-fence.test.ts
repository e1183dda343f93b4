import { describe, expect, it } from "vitest";
import { fenceAction, FENCE_MARGIN_SECONDS, leaseDeadlineNs } from "../../src/lifecycle/lease-fence.ts";

const s = (seconds: number) => BigInt(seconds * 1e9);

describe("lease fence: deadlines", () => {
  it("the deadline is the lease past the time the renewal was sent, less the margin", () => {
    expect(FENCE_MARGIN_SECONDS).toBe(3);
    expect(leaseDeadlineNs(s(1000), 15)).toBe(s(1012));
    expect(leaseDeadlineNs(123n, 15, 0)).toBe(123n + s(15));
  });

  const now = { bootId: "boot-1", ns: s(1000) };
  const order = (deadlineNs: bigint | string, extra: object = {}) => ({ bootId: "boot-1", deadlineNs: String(deadlineNs), ...extra });

  it("holds while the deadline is ahead, kills from the moment it passes", () => {
    expect(fenceAction(order(s(1000) + 1n), now)).toBe("hold");
    expect(fenceAction(order(s(1000)), now)).toBe("kill");
    expect(fenceAction(order(s(999)), now)).toBe("kill");
  });

  it("a deadline of another boot (CLOCK_MONOTONIC started again) is no deadline", () => {
    expect(fenceAction({ ...order(s(5000)), bootId: "boot-0" }, now)).toBe("kill");
  });

  it("no order, or one it cannot read, kills: a fence never holds guests alive on a guess", () => {
    for (const bad of [undefined, null, "x", 42, [], {}, { bootId: "boot-1" }, order("-5"), order("12.5"), order("1e30"), order("9".repeat(31)), { bootId: "boot-1", deadlineNs: 5 }]) {
      expect(fenceAction(bad, now), JSON.stringify(bad)).toBe("kill");
    }
  });

  it("a stop order (the server stopped gracefully) exits, after the last kills", () => {
    expect(fenceAction(order("0", { stop: true }), now)).toBe("exit");
    expect(fenceAction(order(s(5000), { stop: "yes" }), now)).toBe("hold");
  });
});
