import { describe, expect, it } from "vitest";
import { ReleaseStack } from "../../src/vmm/release-stack.ts";

describe("ReleaseStack", () => {
  it("releases newest first, each step once, and carries on past a failing step", async () => {
    const stack = new ReleaseStack();
    const log: string[] = [];
    const uid = await stack.acquire("uid", () => 42, async (u) => void log.push(`uid ${u}`));
    stack.push("network", async () => void log.push("network"));
    stack.push("jail", async () => {
      log.push("jail");
      throw new Error("cgroup busy");
    });
    stack.push("qemu", async () => void log.push("qemu"));
    expect(uid).toBe(42);
    await expect(stack.release()).rejects.toThrow("releasing host resources failed: jail: cgroup busy");
    expect(log).toEqual(["qemu", "jail", "network", "uid 42"]);
    await stack.release();
    expect(log).toHaveLength(4);
    expect(stack.size).toBe(0);
  });

  it("registers nothing when acquiring fails", async () => {
    const stack = new ReleaseStack();
    await expect(stack.acquire("port", () => Promise.reject(new Error("no port")), async () => undefined)).rejects.toThrow("no port");
    expect(stack.size).toBe(0);
  });
});
