import { describe, expect, it } from "vitest";
import { loopbackUrl } from "../../packages/mcp/src/http.ts";
import { clip, outputBudgets, wholeCharsLength } from "../../packages/mcp/src/output.ts";

describe("MCP tool output", () => {
  it("keeps text that fits, and cuts the middle of what does not at character boundaries, saying how much", () => {
    expect(clip("short", 16, "stdout")).toBe("short");
    const long = `${"é".repeat(1000)}END`; // 2003 bytes, two per é
    const cut = clip(long, 101, "stdout");
    const [head, note, tail] = cut.split("\n");
    expect(head).toBe("é".repeat(25)); // 50 bytes: the 51st would split a character
    expect(tail).toBe(`${"é".repeat(24)}END`);
    expect(note).toBe(`[… ${2003 - 50 - 51} of 2003 bytes of stdout cut here; to see all of it, redirect the output to a file in the sandbox (cmd > /tmp/out.txt 2>&1) and page through it with read_file and its offset …]`);
  });

  it("shares the budget between stdout and stderr, giving one what the other leaves", () => {
    expect(outputBudgets("a".repeat(50_000), "b".repeat(100), 16_384)).toEqual({ stdout: 16_284, stderr: 100 });
    expect(outputBudgets("a".repeat(10), "b".repeat(50_000), 16_384)).toEqual({ stdout: 8192, stderr: 16_374 });
    expect(outputBudgets("a".repeat(50_000), "b".repeat(50_000), 16_384)).toEqual({ stdout: 8192, stderr: 8192 });
  });

  it("finds where the last whole UTF-8 character ends", () => {
    const bytes = Buffer.from("aé€😀"); // 1 + 2 + 3 + 4 bytes
    const ends = [0, 1, 1, 3, 3, 3, 6, 6, 6, 6, 10];
    expect(ends.map((_, n) => wholeCharsLength(bytes.subarray(0, n)))).toEqual(ends);
  });

  it("reaches its own server on loopback when it listens on every address", () => {
    expect(loopbackUrl({ address: "0.0.0.0", family: "IPv4", port: 7070 })).toBe("http://127.0.0.1:7070");
    expect(loopbackUrl({ address: "::", family: "IPv6", port: 7070 })).toBe("http://[::1]:7070");
    expect(loopbackUrl({ address: "10.0.0.5", family: "IPv4", port: 80 })).toBe("http://10.0.0.5:80");
    expect(() => loopbackUrl("/run/cocoon.sock")).toThrow("not listening on a TCP port");
  });
});
