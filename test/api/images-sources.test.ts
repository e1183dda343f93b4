import { execFileSync } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { createServer, type Server } from "node:https";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { fetchCode } from "../../src/images/intake.ts";
import { useApi } from "../support/api-fixture.ts";
import { TEST_ROOT } from "../support/paths.ts";
import { makeZip } from "../support/zip.ts";

// Code from an https:// URL (a real TLS server on loopback whose self-signed
// certificate is trusted only through the service's httpsCa, the
// COCOON_HTTPS_CA_FILE setting; loopback is opened to code URIs by the
// operator's COCOON_CODE_URI_PRIVATE_ALLOW for 127.0.0.1 only), what code URIs
// may not reach (SSRF: other loopback, private, link-local and host
// addresses, directly or by a redirect; S3 outside the tenant's s3Allow), and
// FROM scratch with a static binary.

const certDir = await mkdtemp(join(TEST_ROOT, "tls-"));
/** A self-signed certificate for `san` (e.g. "IP:127.0.0.1"). */
async function selfSigned(name: string, san: string): Promise<{ cert: string; key: string }> {
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
    "-subj", `/CN=${name}`, "-addext", `subjectAltName=${san}`,
    "-keyout", join(certDir, `${name}.key`), "-out", join(certDir, `${name}.pem`),
  ], { stdio: "ignore" });
  return { cert: await readFile(join(certDir, `${name}.pem`), "utf8"), key: await readFile(join(certDir, `${name}.key`), "utf8") };
}
const { cert, key } = await selfSigned("127.0.0.1", "IP:127.0.0.1");

process.env.COCOON_CODE_URI_PRIVATE_ALLOW = "127.0.0.1/32"; // read at each fetch; 127.0.0.2 and the rest of loopback stay refused
const api = await useApi({ capacity: { vcpus: 4, memoryMiB: 2 * 1024 }, images: { readyTimeoutMs: 90_000, settleMs: 1500, httpsCa: cert } });
const alice = await api.tenantKey("alice", ["microvm:*", "image:*"]);
afterAll(() => {
  delete process.env.COCOON_CODE_URI_PRIVATE_ALLOW;
});

async function waitBuilt(imageId: string, timeoutMs = 600_000): Promise<Record<string, any>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const res = await api.call("GET", `/v1/images/${imageId}`, { key: alice });
    if (res.body.state !== "BUILDING" && res.body.state !== "PENDING") return res.body;
    if (Date.now() > deadline) throw new Error(`image ${imageId} still ${res.body.state}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}
const buildLog = async (imageId: string) => (await api.call("GET", `/v1/images/${imageId}/build-log`, { key: alice })).text;

describe("code from an https:// URL", () => {
  const zip = makeZip([{ name: "hello.txt", data: "over tls\n" }]);
  let server: Server;
  let base = "";
  const requests: string[] = [];

  beforeAll(async () => {
    server = createServer({ key, cert }, (req, res) => {
      requests.push(req.url ?? "");
      if (req.url === "/app.zip") res.writeHead(200, { "content-type": "application/zip", "content-length": zip.length }).end(zip);
      else if (req.url === "/moved") res.writeHead(302, { location: "/app.zip" }).end();
      else res.writeHead(404).end("no such file");
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    base = `https://127.0.0.1:${(server.address() as { port: number }).port}`;
  });

  afterAll(async () => {
    await new Promise((r) => server.close(r));
    await rm(certDir, { recursive: true, force: true });
  });

  it("builds a READY image whose code is downloaded over verified TLS", async () => {
    const res = await api.call("POST", "/v1/images", {
      key: alice,
      body: { name: "from-https", dockerfile: "FROM debian:bookworm-slim\nCOPY hello.txt /srv/\nCMD [\"sleep\", \"infinity\"]\n", codeUri: `${base}/app.zip` },
    });
    expect(res.status, res.text).toBe(202);
    expect(res.body.codeSource).toBe(`${base}/app.zip`);
    const image = await waitBuilt(res.body.imageId);
    expect(image.state, `${image.stateReason}\n${await buildLog(image.imageId)}`).toBe("READY");
    const vm = await api.call("POST", "/v1/microvms", { key: alice, body: { image: "from-https" } });
    expect(vm.status, vm.text).toBe(201);
    const out = await api.call("POST", `/v1/microvms/${vm.body.microVmId}/exec`, { key: alice, body: { command: "cat /srv/hello.txt" } });
    expect(out.body.stdout).toBe("over tls\n");
    await api.call("DELETE", `/v1/microvms/${vm.body.microVmId}`, { key: alice });
    expect((await api.call("DELETE", "/v1/images/from-https", { key: alice })).status).toBe(200);
  });

  it("refuses a 404 naming the URL, and http://, before any build", async () => {
    const missing = await api.call("POST", "/v1/images", { key: alice, body: { name: "gone", dockerfile: "FROM scratch\n", codeUri: `${base}/missing.zip` } });
    expect(missing.status, missing.text).toBe(400);
    expect(missing.body.error).toMatchObject({ code: "ValidationError", details: { field: "codeUri" } });
    expect(missing.body.error.message).toBe(`cannot fetch codeUri ${base}/missing.zip: the server answered 404`);

    const plain = await api.call("POST", "/v1/images", { key: alice, body: { name: "plain", dockerfile: "FROM scratch\n", codeUri: "http://127.0.0.1:1/app.zip" } });
    expect(plain.status, plain.text).toBe(400);
    expect(plain.body.error.message).toContain("codeUri scheme http: is not supported");
    expect((await api.call("GET", "/v1/images", { key: alice })).body.images).toEqual([]);
  });

  it("follows a redirect, and without the extra CA the self-signed certificate is refused", async () => {
    const opts = { stagingDir: join(certDir, "staging"), maxBytes: 1 << 20, admin: false, s3: {} };
    const staged = await fetchCode(`${base}/moved`, { ...opts, httpsCa: cert });
    expect(staged.sizeBytes).toBe(zip.length);
    await rm(staged.path);
    const before = requests.length;
    await expect(fetchCode(`${base}/app.zip`, opts)).rejects.toThrow(/cannot fetch codeUri .*: request failed: self[- ]signed certificate/);
    expect(requests.length).toBe(before); // the handshake failed: no request reached the server
  });
});

/** An https server on `host` that counts its requests and answers `routes` (path → status and headers), else 404. */
async function httpsServer(host: string, tls: { cert: string; key: string }, routes: Record<string, [number, Record<string, string | number>, Buffer?]>) {
  const requests: string[] = [];
  const server = createServer(tls, (req, res) => {
    requests.push(req.url ?? "");
    const [status, headers, body] = routes[req.url ?? ""] ?? [404, {}];
    res.writeHead(status, headers).end(body);
  });
  await new Promise<void>((r) => server.listen(0, host, r));
  return { server, requests, base: `https://${host.includes(":") ? `[${host}]` : host}:${(server.address() as { port: number }).port}` };
}

const hostIp = Object.values(networkInterfaces())
  .flat()
  .find((i) => i?.family === "IPv4" && !i.internal)!.address;

describe("code URIs cannot reach what the server can (SSRF)", () => {
  const zip = makeZip([{ name: "a.txt", data: "a\n" }]);
  const opts = { stagingDir: join(certDir, "staging"), maxBytes: 1 << 20, admin: true, s3: {}, httpsCa: cert };
  let inside: Awaited<ReturnType<typeof httpsServer>>;
  let loopback2: Awaited<ReturnType<typeof httpsServer>>;
  let hostServer: Awaited<ReturnType<typeof httpsServer>>;

  beforeAll(async () => {
    loopback2 = await httpsServer("127.0.0.2", { cert, key }, { "/app.zip": [200, { "content-length": zip.length }, zip] });
    hostServer = await httpsServer(hostIp, { cert, key }, { "/app.zip": [200, { "content-length": zip.length }, zip] });
    const to = (target: string): [number, Record<string, string>] => [302, { location: target }];
    inside = await httpsServer("127.0.0.1", { cert, key }, {
      "/app.zip": [200, { "content-length": zip.length }, zip],
      "/to-loopback": to(`${loopback2.base}/app.zip`),
      "/to-host": to(`${hostServer.base}/app.zip`),
      "/to-metadata": to("https://169.254.169.254/latest/meta-data/iam/security-credentials/"),
      "/to-private": to("https://10.1.2.3/app.zip"),
      "/to-mapped": to(`https://[::ffff:127.0.0.2]:${new URL(loopback2.base).port}/app.zip`),
      "/to-http": to("http://127.0.0.1/app.zip"),
    });
  });
  afterAll(() => {
    for (const s of [inside, loopback2, hostServer]) s?.server.close();
  });

  it("refuses loopback, private, link-local and the host's own addresses, before connecting, naming no address", async () => {
    const targets = [
      `${loopback2.base}/app.zip`,
      `https://[::1]:${new URL(loopback2.base).port}/app.zip`,
      `https://[::ffff:127.0.0.2]:${new URL(loopback2.base).port}/app.zip`,
      `${hostServer.base}/app.zip`,
      "https://169.254.169.254/latest/meta-data/",
      "https://10.1.2.3/app.zip",
      "https://192.168.0.1/app.zip",
      "https://100.64.0.1/app.zip",
      "https://[fd00::1]/app.zip",
      "https://[fe80::1]/app.zip",
    ];
    for (const uri of targets) {
      const res = await api.call("POST", "/v1/images", { key: alice, body: { name: "ssrf", dockerfile: "FROM scratch\n", codeUri: uri } });
      expect(res.status, uri).toBe(400);
      expect(res.body.error).toEqual({ code: "ValidationError", message: `cannot fetch codeUri ${uri}: refused: the address is not public`, details: { field: "codeUri" } });
    }
    expect(loopback2.requests).toEqual([]);
    expect(hostServer.requests).toEqual([]);
  });

  it("refuses the same at every redirect from an allowed server, and the message names neither the target nor its address", async () => {
    for (const path of ["/to-loopback", "/to-host", "/to-metadata", "/to-private", "/to-mapped"]) {
      const uri = `${inside.base}${path}`;
      const err = await fetchCode(uri, opts).then(() => undefined, (e: Error) => e);
      expect(err?.message, path).toBe(`cannot fetch codeUri ${uri}: refused: the address is not public`);
    }
    expect(loopback2.requests).toEqual([]);
    expect(hostServer.requests).toEqual([]);
    await expect(fetchCode(`${inside.base}/to-http`, opts)).rejects.toThrow("redirected to http: (only https is followed)");
    // A name is resolved and checked like an address: localhost is loopback, refused without the operator's range.
    const viaName = `https://localhost:${new URL(inside.base).port}/app.zip`;
    await expect(fetchCode(viaName, { ...opts, privateAllow: [] })).rejects.toThrow(`cannot fetch codeUri ${viaName}: refused: the address is not public`);
    await expect(fetchCode("https://nothing.invalid/app.zip", opts)).rejects.toThrow("cannot fetch codeUri https://nothing.invalid/app.zip: the host name does not resolve");
    const staged = await fetchCode(`${inside.base}/app.zip`, opts); // the allowed server itself works
    expect(staged.sizeBytes).toBe(zip.length);
    await rm(staged.path);
  });

  it("does not echo the names in a certificate that does not match", async () => {
    const internal = await selfSigned("build.internal.corp.example", "DNS:build.internal.corp.example");
    const server = await httpsServer("127.0.0.1", internal, { "/app.zip": [200, {}, zip] });
    const err = await fetchCode(`${server.base}/app.zip`, { ...opts, httpsCa: internal.cert }).then(() => undefined, (e: Error) => e);
    server.server.close();
    expect(err?.message).toBe(`cannot fetch codeUri ${server.base}/app.zip: request failed: the certificate is not valid for this host name`);
    expect(server.requests).toEqual([]);
  });
});

describe("s3:// within the tenant's s3Allow", () => {
  let s3: { close(): Promise<void> };
  let s3Dir: string;
  let s3Opts: { endpoint: string; region: string; forcePathStyle: boolean };
  const zip = makeZip([{ name: "a.txt", data: "from s3\n" }]);
  const saved = { ...process.env };

  beforeAll(async () => {
    const { default: S3rver } = await import("s3rver");
    s3Dir = await mkdtemp(join(TEST_ROOT, "s3-"));
    const server = new S3rver({ port: 0, address: "127.0.0.1", silent: true, directory: s3Dir, configureBuckets: [{ name: "code" }, { name: "other" }] });
    const { port } = await server.run();
    s3 = server;
    Object.assign(process.env, { AWS_ACCESS_KEY_ID: "S3RVER", AWS_SECRET_ACCESS_KEY: "S3RVER", AWS_REGION: "us-east-1" });
    s3Opts = { endpoint: `http://127.0.0.1:${port}`, region: "us-east-1", forcePathStyle: true };
    (api.images as unknown as { opts: { s3: unknown } }).opts.s3 = s3Opts;
    const { S3Client, PutObjectCommand } = await import("@aws-sdk/client-s3");
    const client = new S3Client(s3Opts);
    for (const [bucket, k] of [["code", "apps/a.zip"], ["code", "secret/keys.zip"], ["other", "apps/a.zip"]]) {
      await client.send(new PutObjectCommand({ Bucket: bucket, Key: k, Body: zip }));
    }
    client.destroy();
  });
  afterAll(async () => {
    process.env = saved;
    await s3?.close();
    await rm(s3Dir, { recursive: true, force: true });
  });

  const create = (codeUri: string, key = alice) => api.call("POST", "/v1/images", { key, body: { name: "s3", dockerfile: "FROM scratch\n", codeUri } });

  it("admins set a tenant's s3Allow; entries are checked and named; only admins see or change it", async () => {
    const admin = api.adminKey;
    const bad = await api.call("PATCH", "/v1/tenants/alice", { key: admin, body: { s3Allow: ["code/apps/", "Code/"] } });
    expect(bad.status, bad.text).toBe(400);
    expect(bad.body.error).toMatchObject({ code: "ValidationError", details: { field: "s3Allow[1]" } });
    const dots = await api.call("PATCH", "/v1/tenants/alice", { key: admin, body: { s3Allow: ["code/apps/../"] } });
    expect(dots.body.error?.details).toEqual({ field: "s3Allow[0]" });
    expect((await api.call("PATCH", "/v1/tenants/alice", { key: admin, body: { s3allow: [] } })).status).toBe(400);
    expect((await api.call("PATCH", "/v1/tenants/nobody", { key: admin, body: { s3Allow: [] } })).status).toBe(404);
    expect((await api.call("PATCH", "/v1/tenants/alice", { key: alice, body: { s3Allow: ["other/"] } })).status).toBe(403);
    expect((await api.call("GET", "/v1/tenants", { key: alice })).status).toBe(403);

    const set = await api.call("PATCH", "/v1/tenants/alice", { key: admin, body: { s3Allow: ["code/apps/"] } });
    expect(set.status, set.text).toBe(200);
    expect(set.body).toMatchObject({ name: "alice", s3Allow: ["code/apps/"] });
    expect((await api.call("GET", "/v1/tenants/alice", { key: admin })).body).toEqual(set.body);
    expect((await api.call("GET", `/v1/tenants/${set.body.tenantId}`, { key: admin })).body).toEqual(set.body);
    const all = (await api.call("GET", "/v1/tenants", { key: admin })).body.tenants as { name: string; s3Allow: string[] }[];
    expect(all.map((t) => [t.name, t.s3Allow])).toEqual(expect.arrayContaining([["alice", ["code/apps/"]], ["admin", []]]));
    const created = await api.call("POST", "/v1/tenants", { key: admin, body: { name: "carol", s3Allow: ["other/"] } });
    expect(created.status, created.text).toBe(201);
    expect(created.body).toMatchObject({ name: "carol", s3Allow: ["other/"] });
  });

  it("refuses s3:// outside the list (403), an empty list, admins included, and a bad key (400), before fetching", async () => {
    await api.call("PATCH", "/v1/tenants/alice", { key: api.adminKey, body: { s3Allow: ["code/apps/"] } });
    for (const uri of ["s3://code/secret/keys.zip", "s3://other/apps/a.zip", "s3://code/apps/../secret/keys.zip", "s3://code/apps/%2E%2E/secret/keys.zip", "s3://code/appsx/a.zip"]) {
      const res = await create(uri);
      expect(res.status, `${uri}: ${res.text}`).toBe(403);
      expect(res.body.error).toMatchObject({ code: "Forbidden", details: { field: "codeUri" } });
    }
    const bob = await api.tenantKey("bob-s3", ["image:*"]); // no s3Allow at all
    expect((await create("s3://code/apps/a.zip", bob)).status).toBe(403);
    expect((await create("s3://code/apps/a.zip", api.adminKey)).status).toBe(403); // the admin tenant's list is empty too
    for (const [uri, message] of [
      ["s3://code/apps/%zz.zip", "the key is not valid percent-encoding"],
      ["s3://code/apps%2F..%2Fsecret%2Fkeys.zip", "a key with . or .. segments is not accepted"],
      ["s3://code/", "expected s3://bucket/key"],
      ["s3://code:9000/apps/a.zip", "expected s3://bucket/key"],
      ["s3://Code/apps/a.zip", "expected s3://bucket/key"],
    ]) {
      const res = await create(uri!);
      expect(res.status, `${uri}: ${res.text}`).toBe(400);
      expect(res.body.error).toEqual({ code: "ValidationError", message: `cannot fetch codeUri ${uri}: ${message}`, details: { field: "codeUri" } });
    }
    expect((await api.call("GET", "/v1/images", { key: alice })).body.images.filter((i: { name: string }) => i.name === "s3")).toEqual([]);
  });

  it("fetches s3:// inside the list", async () => {
    const staged = await fetchCode("s3://code/apps/a.zip", { stagingDir: join(certDir, "staging"), maxBytes: 1 << 20, admin: false, s3: s3Opts, s3Allow: ["code/apps/"] });
    expect(staged).toMatchObject({ sizeBytes: zip.length, source: "s3://code/apps/a.zip" });
    await rm(staged.path);
  });
});

describe("FROM scratch", () => {
  it("builds an image from a static binary alone (its EXPOSEd port is the readiness check), launches it, serves and execs", async () => {
    const busybox = await readFile("/bin/busybox"); // Debian's busybox-static (scripts/setup.sh)
    const form = new FormData();
    form.set("name", "bare");
    // No HEALTHCHECK: readiness is the EXPOSEd port listening, read from /proc/net/tcp through the agent (there is no cat).
    form.set(
      "dockerfile",
      'FROM scratch\nCOPY busybox /bin/busybox\nCOPY index.html /www/index.html\nENV GREETING=from-scratch\nEXPOSE 8080\nCMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]\n',
    );
    const files = [
      { name: "busybox", data: busybox, mode: 0o100755, deflate: true },
      { name: "index.html", data: "hello from scratch\n" },
    ];
    form.set("code", new Blob([new Uint8Array(makeZip(files))]), "code.zip");
    const res = await fetch(`${api.url}/v1/images`, { method: "POST", headers: { authorization: `Bearer ${alice}` }, body: form });
    const created = (await res.json()) as Record<string, any>;
    expect(res.status, JSON.stringify(created)).toBe(202);
    const image = await waitBuilt(created.imageId);
    const log = await buildLog(created.imageId);
    expect(image.state, `${image.stateReason}\n${log}`).toBe("READY");
    expect(log).toContain("==> line 2: COPY busybox /bin/busybox");

    const vm = await api.call("POST", "/v1/microvms", { key: alice, body: { image: "bare" } });
    expect(vm.status, vm.text).toBe(201);
    const page = await fetch(`${api.url}/v1/microvms/${vm.body.microVmId}/http/?cocoon_token=${vm.body.endpoint.token}`);
    expect(await page.text()).toBe("hello from scratch\n");
    const out = await api.call("POST", `/v1/microvms/${vm.body.microVmId}/exec`, {
      key: alice,
      body: { command: ["/bin/busybox", "sh", "-c", "echo $GREETING; /bin/busybox ls /; /bin/busybox ps | /bin/busybox grep -c '[b]usybox httpd'"] },
    });
    expect(out.status, out.text).toBe(200);
    expect(out.body.exitCode, out.text).toBe(0);
    const [greeting, ...rest] = out.body.stdout.trim().split("\n");
    expect(greeting).toBe("from-scratch");
    expect(rest.join(" ")).toMatch(/\bbin\b/);
    expect(Number(rest.at(-1))).toBeGreaterThanOrEqual(1); // the app (CMD) runs in the launched VM
    // No /bin/sh in the image: a shell-form command is refused, not faked.
    const sh = await api.call("POST", `/v1/microvms/${vm.body.microVmId}/exec`, { key: alice, body: { command: "echo hi" } });
    if (sh.status === 200) expect(sh.body.exitCode, sh.text).not.toBe(0);
    else expect(sh.status, sh.text).toBeLessThan(500);
    await api.call("DELETE", `/v1/microvms/${vm.body.microVmId}`, { key: alice });
  });
});
