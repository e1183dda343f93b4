import { chmod, mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { accountOf, awsMicroVmState, decodePageToken, paginate, parseArn, resourceName } from "../../src/api/aws/protocol.ts";
import { ApiError } from "../../src/errors.ts";
import { normalizeHooks } from "../../src/images/hooks.ts";
import { AccessTokens } from "../../src/router/access-tokens.ts";
import { openDatabase } from "../../src/store/db.ts";
import { IdempotencyTokens } from "../../src/store/idempotency.ts";
import { ServerSecrets } from "../../src/store/secrets.ts";
import { listTags, tagResource } from "../../src/store/tags.ts";

const dir = await mkdtemp(join(tmpdir(), "cocoon-aws-unit-"));
afterAll(() => rm(dir, { recursive: true, force: true }));

describe("sealed secrets and the master key", () => {
  it("creates a 0600 master key once, seals bound to a context, and refuses tampering", async () => {
    const secrets = await ServerSecrets.open(dir);
    expect((await stat(join(dir, "master.key"))).mode & 0o777).toBe(0o600);
    const again = await ServerSecrets.open(dir);
    const sealed = secrets.seal("ck_secret", "key-1");
    expect(sealed).not.toContain("ck_secret");
    expect(again.unseal(sealed, "key-1")).toBe("ck_secret");
    expect(() => again.unseal(sealed, "key-2")).toThrow();
    const raw = Buffer.from(sealed.slice(3), "base64url");
    raw[raw.length - 1]! ^= 1;
    expect(() => again.unseal(`v1.${raw.toString("base64url")}`, "key-1")).toThrow();
    expect(secrets.derive("a")).toEqual(again.derive("a"));
    expect(secrets.derive("a")).not.toEqual(secrets.derive("b"));
    const other = await mkdtemp(join(dir, "other-"));
    const elsewhere = await ServerSecrets.open(other);
    expect(() => elsewhere.unseal(sealed, "key-1")).toThrow();
  });

  it("refuses a master key others can read", async () => {
    const loose = await mkdtemp(join(dir, "loose-"));
    await ServerSecrets.open(loose);
    await chmod(join(loose, "master.key"), 0o644);
    await expect(ServerSecrets.open(loose)).rejects.toThrow("chmod 600");
    expect((await readFile(join(loose, "master.key"), "utf8")).trim()).toMatch(/^[0-9a-f]{64}$/);
  });
});

describe("access tokens", () => {
  const tokens = new AccessTokens(Buffer.alloc(32, 7));
  const expiresAt = new Date(Date.now() + 60_000);

  it("open only their VM's ports until they expire", () => {
    const one = tokens.issue({ microVmId: "vm-a", ports: { ports: [8080, 9000] }, expiresAt });
    expect(tokens.verify(one, "vm-a", 8080)).toBe(true);
    expect(tokens.verify(one, "vm-a", 9000)).toBe(true);
    expect(tokens.verify(one, "vm-a", 8081)).toBe(false);
    expect(tokens.verify(one, "vm-b", 8080)).toBe(false);
    expect(tokens.verify(one, "vm-a", 8080, new Date(expiresAt.getTime() + 1000))).toBe(false);
    const range = tokens.issue({ microVmId: "vm-a", ports: { from: 3000, to: 3010 }, expiresAt });
    expect([2999, 3000, 3010, 3011].map((p) => tokens.verify(range, "vm-a", p))).toEqual([false, true, true, false]);
    expect(tokens.verify(tokens.issue({ microVmId: "vm-a", ports: { all: true }, expiresAt }), "vm-a", 1)).toBe(true);
  });

  it("refuse forgeries: another secret, an edited payload, garbage, oversized", () => {
    const token = tokens.issue({ microVmId: "vm-a", ports: { ports: [80] }, expiresAt });
    expect(new AccessTokens(Buffer.alloc(32, 8)).verify(token, "vm-a", 80)).toBe(false);
    const [payload, mac] = token.slice(4).split(".");
    const edited = Buffer.from(JSON.stringify({ ...JSON.parse(Buffer.from(payload!, "base64url").toString()), p: { all: true } })).toString("base64url");
    expect(tokens.verify(`cat_${edited}.${mac}`, "vm-a", 81)).toBe(false);
    for (const bad of ["", "cat_", "cat_x.y", `${token}.z`, `cat_${"a".repeat(9000)}.b`, token.replace("cat_", "xyz_")]) expect(tokens.verify(bad, "vm-a", 80)).toBe(false);
  });
});

describe("AWS protocol helpers", () => {
  it("derives a stable 12-digit account per tenant and reads ARNs", () => {
    expect(accountOf("tnt-1")).toMatch(/^\d{12}$/);
    expect(accountOf("tnt-1")).toBe(accountOf("tnt-1"));
    expect(accountOf("tnt-1")).not.toBe(accountOf("tnt-2"));
    expect(parseArn(`arn:aws:lambda:us-east-1:${accountOf("t")}:microvm/vm-1`)).toEqual({ region: "us-east-1", account: accountOf("t"), type: "microvm", id: "vm-1" });
    expect(parseArn("arn:aws:lambda:us-east-1:aws:microvm-image/base")?.account).toBe("aws");
    for (const bad of ["arn:aws:s3:::bucket", "arn:aws:lambda:x:123:microvm/a/b", "vm-1"]) expect(parseArn(bad)).toBeUndefined();
    expect(resourceName(`arn:aws:lambda:r:${accountOf("t")}:microvm/vm-1`, "t", "microvm", "id")).toBe("vm-1");
    expect(() => resourceName(`arn:aws:lambda:r:${accountOf("u")}:microvm/vm-1`, "t", "microvm", "id")).toThrow(/not found/);
    expect(() => resourceName("arn:aws:lambda:r:aws:microvm-image/base", "t", "microvm-image", "id")).toThrow(/not found/);
    expect(resourceName("arn:aws:lambda:r:aws:microvm-image/base", "t", "microvm-image", "id", true)).toBe("base");
  });

  it("maps every state into AWS's enum and pages lists with opaque tokens", () => {
    expect(["PENDING", "RESUMING", "FAILED", "SUSPENDING"].map((s) => awsMicroVmState(s as never))).toEqual(["PENDING", "PENDING", "TERMINATED", "SUSPENDING"]);
    const first = paginate([1, 2, 3, 4, 5], (n) => n, { maxResults: 2 });
    expect(first.items).toEqual([1, 2]);
    const second = paginate([1, 2, 3, 4, 5], (n) => n, { maxResults: 2, nextToken: first.nextToken });
    const third = paginate([1, 2, 3, 4, 5], (n) => n, { maxResults: 2, nextToken: second.nextToken });
    expect([second.items, third.items, third.nextToken]).toEqual([[3, 4], [5], undefined]);
    for (const bad of ["%%", "e30", Buffer.from('{"after":{}}').toString("base64url")]) expect(() => decodePageToken(bad)).toThrow(ApiError);
  });
});

describe("hooks declarations", () => {
  it("default to every hook on with its timeout, and name a bad field", () => {
    expect(normalizeHooks({ port: 8081 }).hooks).toMatchObject({ ready: { timeoutSeconds: 60 }, run: { timeoutSeconds: 10 }, terminate: { timeoutSeconds: 10 } });
    expect(normalizeHooks({ port: 8081, enabled: ["run"], timeoutSeconds: { run: 5, ready: 9 } }).hooks).toEqual({ run: { timeoutSeconds: 5 } });
    expect(() => normalizeHooks({ port: 0 })).toThrow("hooks.port must be an integer between 1 and 65535");
    expect(() => normalizeHooks({ port: 10789 })).toThrow("agent's own port");
    expect(() => normalizeHooks({ port: 8081, timeoutSeconds: { run: 61 } })).toThrow("hooks.timeoutSeconds.run must be an integer between 1 and 60");
    expect(() => normalizeHooks({ port: 8081, enabled: ["boot" as never] })).toThrow("unknown hook boot");
  });
});

describe("idempotency and tags (SQLite)", async () => {
  const db = await openDatabase(await mkdtemp(join(dir, "db-")));
  afterAll(() => db.destroy());
  await db.insertInto("tenants").values({ id: "t1", name: "t1", created_at: new Date().toISOString() }).execute();

  it("creates once per token: replays the same request, refuses another, remembers no failure", async () => {
    const tokens = new IdempotencyTokens(db);
    let made = 0;
    const create = async () => `vm-${++made}`;
    const key = { tenantId: "t1", operation: "run", token: "tok" };
    const [a, b] = await Promise.all([tokens.run(key, { image: "base", n: 1 }, create), tokens.run(key, { n: 1, image: "base" }, create)]);
    expect([a, b]).toEqual([{ resourceId: "vm-1", replayed: false }, { resourceId: "vm-1", replayed: true }]);
    await expect(tokens.run(key, { image: "other" }, create)).rejects.toMatchObject({ code: "Conflict" });
    expect((await tokens.run({ ...key, operation: "other" }, {}, create)).resourceId).toBe("vm-2");
    await expect(tokens.run({ ...key, token: "fails" }, {}, async () => Promise.reject(new Error("boom")))).rejects.toThrow("boom");
    expect((await tokens.run({ ...key, token: "fails" }, {}, create)).resourceId).toBe("vm-3");
    await expect(tokens.run({ ...key, token: "bad token" }, {}, create)).rejects.toMatchObject({ code: "ValidationError" });
  });

  it("keeps at most 50 tags per resource", async () => {
    const vm = { type: "microvm" as const, id: "vm-1" };
    await tagResource(db, "t1", vm, Object.fromEntries(Array.from({ length: 50 }, (_, i) => [`k${i}`, "v"])));
    await tagResource(db, "t1", vm, { k0: "replaced" });
    expect(Object.keys(await listTags(db, "t1", vm))).toHaveLength(50);
    await expect(tagResource(db, "t1", vm, { one: "more" })).rejects.toMatchObject({ code: "QuotaExceeded" });
    expect((await listTags(db, "t1", vm)).k0).toBe("replaced");
  });
});
