import { describe, expect, it } from "vitest";
import { redactUrl } from "../../src/api/fastify.ts";
import { TerminalTickets } from "../../src/api/tickets.ts";
import { AccessTokens } from "../../src/router/access-tokens.ts";
import { endpointHostPattern, splitToken } from "../../src/router/endpoint.ts";
import { closeReason, MAX_CLOSE_REASON_BYTES, sendableCloseCode } from "../../src/router/websocket.ts";

describe("WebSocket close frames", () => {
  it("maps codes that may not be sent to ones that may", () => {
    expect(sendableCloseCode(1005)).toBe(1000); // no code received: a normal close
    expect(sendableCloseCode(1006)).toBe(1001); // the peer vanished: going away
    expect(sendableCloseCode(1015)).toBe(1011);
    for (const code of [0, 999, 1004, 1016, 2000, 2999, 5000, 65535, -1, 1000.5, Number.NaN]) expect(sendableCloseCode(code)).toBe(1011);
    for (const code of [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4000, 4999]) expect(sendableCloseCode(code)).toBe(code);
  });

  it("cuts a reason to 123 bytes of UTF-8 on a character boundary", () => {
    const ids = "é".repeat(100); // 200 bytes
    const cut = closeReason(`microVM ${ids} not found`);
    expect(Buffer.byteLength(cut)).toBeLessThanOrEqual(MAX_CLOSE_REASON_BYTES);
    expect(cut).toBe(`microVM ${"é".repeat(57)}`); // 8 + 114 bytes; the 58th é would need 124
    expect(cut).not.toContain("\uFFFD");
    expect(closeReason("😀".repeat(40))).toBe("😀".repeat(30)); // 4-byte characters: 120 bytes
    expect(closeReason("short")).toBe("short");
  });
});

describe("AccessTokens", () => {
  const tokens = new AccessTokens(Buffer.alloc(32, 7));
  const now = new Date("2030-01-01T00:00:00Z");
  const inAMinute = new Date(now.getTime() + 60_000);

  it("opens only its VM, its ports, until it expires", () => {
    const list = tokens.issue({ microVmId: "vm-a", ports: { ports: [8080, 9000] }, expiresAt: inAMinute });
    expect(tokens.verify(list, "vm-a", 8080, now)).toBe(true);
    expect(tokens.verify(list, "vm-a", 9000, now)).toBe(true);
    expect(tokens.verify(list, "vm-a", 8081, now)).toBe(false);
    expect(tokens.verify(list, "vm-b", 8080, now)).toBe(false);
    expect(tokens.verify(list, "vm-a", 8080, inAMinute)).toBe(false);
    const range = tokens.issue({ microVmId: "vm-a", ports: { from: 8000, to: 8100 }, expiresAt: inAMinute });
    expect([7999, 8000, 8100, 8101].map((p) => tokens.verify(range, "vm-a", p, now))).toEqual([false, true, true, false]);
    const all = tokens.issue({ microVmId: "vm-a", ports: { all: true }, expiresAt: inAMinute });
    expect(tokens.verify(all, "vm-a", 1, now) && tokens.verify(all, "vm-a", 65535, now)).toBe(true);
  });

  it("refuses a token of another secret, a tampered one, and garbage, without throwing", () => {
    const token = tokens.issue({ microVmId: "vm-a", ports: { all: true }, expiresAt: inAMinute });
    expect(new AccessTokens(Buffer.alloc(32, 8)).verify(token, "vm-a", 80, now)).toBe(false);
    const [body, sig] = token.split(".") as [string, string];
    const forged = Buffer.from(JSON.stringify({ v: 1, vm: "vm-b", p: "*", exp: 2e9 })).toString("base64url");
    expect(tokens.verify(`${forged}.${sig}`, "vm-b", 80, now)).toBe(false);
    expect(tokens.verify(`${body}.${sig.slice(0, -2)}`, "vm-a", 80, now)).toBe(false);
    for (const junk of ["", ".", "a.b", "x".repeat(10_000), `${body}.`, `.${sig}`, "%0d%0a"]) expect(tokens.verify(junk, "vm-a", 80, now)).toBe(false);
    expect(() => new AccessTokens(Buffer.alloc(16))).toThrow("at least 32 bytes");
  });
});

describe("endpoint addressing", () => {
  it("removes only Cocoon's token parameter, keeping the others byte for byte", () => {
    expect(splitToken("/a/b?cocoon_token=et_x&q=%7E+1")).toEqual({ path: "/a/b?q=%7E+1", queryToken: "et_x" });
    expect(splitToken("/x?cocoon_token=%0a")).toEqual({ path: "/x", queryToken: "\n" });
    expect(splitToken("/x?cocoon_token=%zz&a")).toEqual({ path: "/x?a", queryToken: undefined });
    expect(splitToken("//[")).toEqual({ path: "//[" });
  });

  it("reads {id} and {port}-{id} endpoint hosts", () => {
    const host = endpointHostPattern("vm.localhost");
    expect(host.exec("vm-ab12.vm.localhost:7070")?.slice(1, 3)).toEqual([undefined, "vm-ab12"]);
    expect(host.exec("8080-vm-ab12.vm.localhost")?.slice(1, 3)).toEqual(["8080", "vm-ab12"]);
    expect(host.test("vm-ab12.vm.localhost.evil.com")).toBe(false);
    expect(host.test("127.0.0.1:7070")).toBe(false);
  });
});

describe("request logs", () => {
  it("redact credential parameters and nothing else", () => {
    expect(redactUrl("/v1/microvms/x/terminal?cols=80&access_token=ck_secret&ticket=tt_1")).toBe("/v1/microvms/x/terminal?cols=80&access_token=[REDACTED]&ticket=[REDACTED]");
    expect(redactUrl("/v1/microvms/x/http/?cocoon%5Ftoken=et_1&q=1")).toBe("/v1/microvms/x/http/?cocoon%5Ftoken=[REDACTED]&q=1");
    expect(redactUrl("/plain")).toBe("/plain");
  });
});

describe("TerminalTickets", () => {
  it("open one terminal of one VM, once, within 30 s", () => {
    const tickets = new TerminalTickets();
    const { ticket, expiresAt } = tickets.issue("tenant-1", "vm-a", 1_000);
    expect(Date.parse(expiresAt)).toBe(31_000);
    expect(tickets.redeem(ticket, "vm-a", 2_000)).toBe("tenant-1");
    expect(() => tickets.redeem(ticket, "vm-a", 2_000)).toThrow("unknown, used or expired");
    const other = tickets.issue("tenant-1", "vm-a", 1_000).ticket;
    expect(() => tickets.redeem(other, "vm-b", 2_000)).toThrow("unknown, used or expired");
    const late = tickets.issue("tenant-1", "vm-a", 1_000).ticket;
    expect(() => tickets.redeem(late, "vm-a", 31_000)).toThrow("unknown, used or expired");
  });
});
