import { execFileSync } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { createServer, type Server } from "node:https";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { fetchCode } from "../../src/images/intake.ts";
import { useApi } from "../support/api-fixture.ts";
import { TEST_ROOT } from "../support/paths.ts";
import { makeZip } from "../support/zip.ts";

// Code from an https:// URL (a real TLS server on loopback whose self-signed
// certificate is trusted only through the service's httpsCa, the
// COCOON_HTTPS_CA_FILE setting) and FROM scratch with a static binary.

const certDir = await mkdtemp(join(TEST_ROOT, "tls-"));
execFileSync("openssl", [
  "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
  "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
  "-keyout", join(certDir, "key.pem"), "-out", join(certDir, "cert.pem"),
], { stdio: "ignore" });
const cert = await readFile(join(certDir, "cert.pem"), "utf8");
const key = await readFile(join(certDir, "key.pem"), "utf8");

const api = await useApi({ capacity: { vcpus: 4, memoryMiB: 2 * 1024 }, images: { readyTimeoutMs: 90_000, settleMs: 1500, httpsCa: cert } });
const alice = await api.tenantKey("alice", ["microvm:*", "image:*"]);

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
    // Nothing recorded: alice has no image but the managed ones.
    expect((await api.call("GET", "/v1/images", { key: alice })).body.images.filter((i: { managed: boolean }) => !i.managed)).toEqual([]);
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
