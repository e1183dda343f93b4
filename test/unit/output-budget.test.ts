import { describe, expect, it } from "vitest";
import { answerBytes, OutputBudget } from "../../src/api/output-budget.ts";

describe("answerBytes", () => {
  it("bounds what a chunk grows to as a JSON answer", () => {
    for (const text of ["plain text", 'quotes " and \\ backslashes', "tabs\tand\nnewlines", "\u0000\u0001\u001f", "é ü 日本", "\uFFFD"]) {
      const chunk = Buffer.from(text);
      const json = Buffer.byteLength(JSON.stringify(chunk.toString()));
      expect(answerBytes(chunk)).toBeGreaterThanOrEqual(chunk.length * 3 + (json - 2) * 2);
    }
    // Broken UTF-8: each byte becomes U+FFFD, three bytes in the answer.
    const broken = Buffer.from([0xff, 0xfe, 0x80]);
    expect(answerBytes(broken)).toBeGreaterThanOrEqual(broken.length * 3 + (Buffer.byteLength(JSON.stringify(broken.toString())) - 2) * 2);
    expect(answerBytes(Buffer.alloc(10))).toBe(10 * 3 + 10 * 6 * 2);
  });
});

describe("OutputBudget", () => {
  it("keeps a prefix of each answer within the capacity, and gives it back once on release", () => {
    const budget = new OutputBudget(1000);
    const a = budget.hold();
    const b = budget.hold();
    const chunk = Buffer.from("x".repeat(100)); // 500 charged
    expect(a.keep(chunk)).toBe(true);
    expect(b.keep(chunk)).toBe(true);
    expect(budget.used).toBe(1000);
    expect(a.keep(Buffer.from("y"))).toBe(false);
    a.release();
    a.release();
    expect(budget.used).toBe(500);
    // Refused once, refused for good: what an answer keeps is a prefix of its output.
    expect(a.keep(Buffer.from("z"))).toBe(false);
    expect(b.keep(Buffer.from("z"))).toBe(true);
    b.release();
    expect(budget.used).toBe(0);
  });
});
