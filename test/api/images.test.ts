import { execFileSync } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { useApi } from "../support/api-fixture.ts";
import { TEST_ROOT } from "../support/paths.ts";
import { makeZip, zipDir } from "../support/zip.ts";

// Short readiness wait and settle: the "never ready" case fails in seconds, not minutes.
const api = await useApi({ capacity: { vcpus: 8, memoryMiB: 4 * 1024 }, images: { readyTimeoutMs: 90_000, settleMs: 1500 } });
const alice = await api.tenantKey("alice", ["microvm:*", "image:*"]);
const bob = await api.tenantKey("bob", ["microvm:*", "image:*"]);
const EXAMPLE = new URL("../../examples/counter-app/", import.meta.url).pathname;

/** POST /v1/images as multipart: name, dockerfile (text), code (zip). */
async function upload(key: string, name: string, dockerfile: string | undefined, zip: Buffer, extra: Record<string, string> = {}) {
  const form = new FormData();
  form.set("name", name);
  if (dockerfile !== undefined) form.set("dockerfile", dockerfile);
  for (const [k, v] of Object.entries(extra)) form.set(k, v);
  form.set("code", new Blob([new Uint8Array(zip)], { type: "application/zip" }), "code.zip");
  const res = await fetch(`${api.url}/v1/images`, { method: "POST", headers: { authorization: `Bearer ${key}` }, body: form });
  const text = await res.text();
  return { status: res.status, body: JSON.parse(text), text };
}

async function waitBuilt(key: string, imageId: string, timeoutMs = 600_000): Promise<Record<string, any>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const res = await api.call("GET", `/v1/images/${imageId}`, { key });
    if (res.body.state !== "BUILDING" && res.body.state !== "PENDING") return res.body;
    if (Date.now() > deadline) throw new Error(`image ${imageId} still ${res.body.state}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function buildLog(key: string, imageId: string): Promise<string> {
  return (await api.call("GET", `/v1/images/${imageId}/build-log`, { key })).text;
}

/** GET / on a VM's app through its forwarded host port. */
async function hit(vmId: string, appPort: number): Promise<{ count: number; greeting: string; user: number }> {
  const port = api.engine.get(vmId).hostPort(appPort);
  if (!port) throw new Error(`${vmId} forwards no port ${appPort}`);
  const res = await fetch(`http://127.0.0.1:${port}/`);
  return (await res.json()) as { count: number; greeting: string; user: number };
}

const tiny = (cmd: string) => `FROM debian:bookworm-slim\nCOPY hello.txt /srv/\nCMD ${cmd}\n`;
const tinyZip = makeZip([{ name: "hello.txt", data: "hi\n" }]);

describe("the example app (examples/counter-app)", () => {
  let image: Record<string, any>;
  let followed = "";

  beforeAll(async () => {
    const dockerfile = await readFile(join(EXAMPLE, "Dockerfile"), "utf8");
    const created = await upload(alice, "counter", dockerfile, await zipDir(EXAMPLE));
    expect(created.status, created.text).toBe(202);
    expect(created.body).toMatchObject({ name: "counter", state: "BUILDING", version: 1, appPort: 8080 });
    // Follow the log while it builds: it ends when the build does.
    const res = await fetch(`${api.url}/v1/images/${created.body.imageId}/build-log?follow=true`, { headers: { authorization: `Bearer ${alice}` } });
    followed = await res.text();
    image = await waitBuilt(alice, created.body.imageId);
  }, 900_000);

  it("is built from Dockerfile + zip into a READY image with digests and sizes", async () => {
    expect(image.state, `${image.stateReason}\n${await buildLog(alice, image.imageId)}`).toBe("READY");
    expect(image).toMatchObject({ appPort: 8080, vcpus: 1, memoryMiB: 512, labels: { "org.opencontainers.image.title": "counter-app" } });
    expect(image.dockerfileDigest).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(image.codeDigest).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(image.sizeBytes).toBe(image.diskBytes + image.memoryBytes);
    expect(image.diskBytes).toBeGreaterThan(1024 * 1024);
    expect(followed).toContain("==> line 6: RUN apt-get update");
    expect(followed).toContain("Setting up python3");
    expect(followed).toMatch(/==> READY in/);
    expect((await api.call("GET", "/v1/images/counter", { key: alice })).body.imageId).toBe(image.imageId);
  });

  it("launches 3 VMs that each serve, with independent counters kept across suspend/resume", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const res = await api.call("POST", "/v1/microvms", { key: alice, body: { image: "counter" } });
      expect(res.status, res.text).toBe(201);
      expect(res.body.imageId).toBe(image.imageId);
      ids.push(res.body.microVmId);
    }
    const [a, b, c] = ids as [string, string, string];
    expect(await hit(a, 8080)).toMatchObject({ count: 1, greeting: "hello from cocoon", user: 1000 });
    expect((await hit(a, 8080)).count).toBe(2);
    expect((await hit(a, 8080)).count).toBe(3);
    expect((await hit(b, 8080)).count).toBe(1);
    expect((await hit(c, 8080)).count).toBe(1);
    expect((await hit(b, 8080)).count).toBe(2);

    expect((await api.call("POST", `/v1/microvms/${a}/suspend`, { key: alice })).body.state).toBe("SUSPENDED");
    expect((await api.call("POST", `/v1/microvms/${a}/resume`, { key: alice })).body.state).toBe("RUNNING");
    expect((await hit(a, 8080)).count).toBe(4);

    // Through the endpoint router too (src/router), to the image's appPort.
    const routed = await api.call("GET", `/v1/microvms/${c}/http/`, { key: alice });
    expect(routed.status, routed.text).toBe(200);
    expect(routed.body.count).toBe(2);

    // The image's ENV is the base env of exec, and a create's env adds to it.
    const exec = await api.call("POST", `/v1/microvms/${c}/exec`, { key: alice, body: { command: "echo $GREETING $PORT; id -un" } });
    expect(exec.body.stdout).toBe("hello from cocoon 8080\nroot\n");

    // In use: no delete without force.
    const del = await api.call("DELETE", `/v1/images/${image.imageId}`, { key: alice });
    expect(del.status, del.text).toBe(409);
    expect(del.body.error.message).toContain("used by 3 microVM(s)");
    for (const id of ids) await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });

  it("refuses another shape for a Dockerfile image, naming the field", async () => {
    const res = await api.call("POST", "/v1/microvms", { key: alice, body: { image: "counter", memoryMiB: 1024 } });
    expect(res.status, res.text).toBe(400);
    expect(res.body.error).toMatchObject({ code: "ValidationError", details: { field: "memoryMiB" } });
    expect(res.body.error.message).toContain("memoryMiB must be 512 for image counter");
  });

  it("is invisible to another tenant", async () => {
    expect((await api.call("GET", `/v1/images/${image.imageId}`, { key: bob })).status).toBe(404);
    expect((await api.call("GET", "/v1/images/counter", { key: bob })).status).toBe(404);
    expect((await api.call("GET", `/v1/images/${image.imageId}/build-log`, { key: bob })).status).toBe(404);
    expect((await api.call("DELETE", `/v1/images/${image.imageId}`, { key: bob })).status).toBe(404);
    expect((await api.call("GET", "/v1/images", { key: bob })).body.images).toEqual([]);
    const launch = await api.call("POST", "/v1/microvms", { key: bob, body: { image: "counter" } });
    expect(launch.status).toBe(404);
    expect((await api.call("POST", "/v1/microvms", { key: bob, body: { image: image.imageId } })).status).toBe(404);
  });
});

describe("S3 intake, versions and delete", () => {
  let s3: { close(): Promise<void> };
  let s3Dir: string;
  const saved = { ...process.env };

  beforeAll(async () => {
    const { default: S3rver } = await import("s3rver");
    s3Dir = await mkdtemp(join(TEST_ROOT, "s3-"));
    const server = new S3rver({ port: 0, address: "127.0.0.1", silent: true, directory: s3Dir, configureBuckets: [{ name: "code" }] });
    const { port } = await server.run();
    s3 = server;
    // The server reads the standard AWS variables and COCOON_S3_ENDPOINT at each fetch.
    Object.assign(process.env, { AWS_ACCESS_KEY_ID: "S3RVER", AWS_SECRET_ACCESS_KEY: "S3RVER", AWS_REGION: "us-east-1" });
    (api.images as unknown as { opts: { s3: unknown } }).opts.s3 = { endpoint: `http://127.0.0.1:${port}`, region: "us-east-1", forcePathStyle: true };
    const { S3Client, PutObjectCommand } = await import("@aws-sdk/client-s3");
    const client = new S3Client({ endpoint: `http://127.0.0.1:${port}`, region: "us-east-1", forcePathStyle: true });
    await client.send(new PutObjectCommand({ Bucket: "code", Key: "apps/tiny.zip", Body: tinyZip }));
    client.destroy();
    // s3:// reads only what an admin allowed the tenant (test/api/images-sources.test.ts tests the refusals).
    expect((await api.call("PATCH", "/v1/tenants/alice", { key: api.adminKey, body: { s3Allow: ["code/"] } })).status).toBe(200);
  });

  afterAll(async () => {
    process.env = saved;
    await s3?.close();
    await rm(s3Dir, { recursive: true, force: true });
  });

  it("builds from s3://, versions a rebuild without disturbing VMs of the old one, and deletes with force", async () => {
    const v1 = await api.call("POST", "/v1/images", { key: alice, body: { name: "tiny", dockerfile: tiny(`["sleep", "infinity"]`), codeUri: "s3://code/apps/tiny.zip" } });
    expect(v1.status, v1.text).toBe(202);
    expect(v1.body.codeSource).toBe("s3://code/apps/tiny.zip");
    const built1 = await waitBuilt(alice, v1.body.imageId);
    expect(built1.state, `${built1.stateReason}\n${await buildLog(alice, v1.body.imageId)}`).toBe("READY");
    const vm1 = (await api.call("POST", "/v1/microvms", { key: alice, body: { image: "tiny" } })).body;
    expect(vm1.imageId).toBe(v1.body.imageId);

    const v2 = await upload(alice, "tiny", tiny(`sleep 1000000`), tinyZip);
    expect(v2.status, v2.text).toBe(202);
    expect(v2.body.version).toBe(2);
    expect((await waitBuilt(alice, v2.body.imageId)).state).toBe("READY");
    const vm2 = (await api.call("POST", "/v1/microvms", { key: alice, body: { image: "tiny" } })).body;
    expect(vm2.imageId).toBe(v2.body.imageId);
    const old = await api.call("POST", `/v1/microvms/${vm1.microVmId}/exec`, { key: alice, body: { command: "cat /srv/hello.txt" } });
    expect(old.body.stdout).toContain("hi");
    expect((await api.call("GET", "/v1/images?name=tiny", { key: alice })).body.images.map((i: { version: number }) => i.version)).toEqual([1, 2]);

    expect((await api.call("DELETE", `/v1/images/${v1.body.imageId}`, { key: alice })).status).toBe(409);
    const forced = await api.call("DELETE", `/v1/images/${v1.body.imageId}?force=true`, { key: alice });
    expect(forced.status, forced.text).toBe(200);
    expect((await api.call("GET", `/v1/microvms/${vm1.microVmId}`, { key: alice })).body.state).toBe("TERMINATED");
    expect((await api.call("GET", `/v1/microvms/${vm2.microVmId}`, { key: alice })).body.state).toBe("RUNNING");
    expect((await api.call("GET", `/v1/images/${v1.body.imageId}`, { key: alice })).status).toBe(404);
    await api.call("DELETE", `/v1/microvms/${vm2.microVmId}`, { key: alice });
    expect((await api.call("DELETE", "/v1/images/tiny", { key: alice })).status).toBe(200);
  });

  it("refuses file:// to a non-admin key and a missing S3 object", async () => {
    const file = await api.call("POST", "/v1/images", { key: alice, body: { name: "f", dockerfile: tiny("true"), codeUri: "file:///etc/hostname" } });
    expect(file.status).toBe(403);
    const missing = await api.call("POST", "/v1/images", { key: alice, body: { name: "m", dockerfile: tiny("true"), codeUri: "s3://code/nope.zip" } });
    expect(missing.status).toBe(400);
    expect(missing.body.error.message).toContain("cannot fetch codeUri s3://code/nope.zip");
  });
});

describe("COPY and ADD", () => {
  it("copies globs and directories with --chown, unpacks local tars with ADD, honours .dockerignore, leaves no build context, and builds FROM another image", async () => {
    const tarball = execFileSync("tar", ["-C", EXAMPLE, "-cf", "-", "app.py"]);
    const zip = makeZip([
      { name: ".dockerignore", data: "src/ignored.txt\n" },
      { name: "src/a.txt", data: "A\n" },
      { name: "src/b.txt", data: "B\n" },
      { name: "src/ignored.txt", data: "secret\n" },
      { name: "src/run.sh", data: "#!/bin/sh\necho ran\n", mode: 0o100755 },
      { name: "vendor.tar", data: tarball },
    ]);
    const dockerfile = [
      "FROM debian:bookworm-slim",
      "ARG WHO=nobody",
      "WORKDIR /app",
      "COPY src/*.txt ./txt/",
      "COPY --chown=${WHO}:nogroup src /app/owned",
      "ADD vendor.tar /opt/vendor/",
      'RUN ["/app/owned/run.sh"]',
    ].join("\n");
    const res = await upload(alice, "files", dockerfile, zip, { buildArgs: JSON.stringify({ WHO: "nobody" }) });
    expect(res.status, res.text).toBe(202);
    const image = await waitBuilt(alice, res.body.imageId);
    const log = await buildLog(alice, res.body.imageId);
    expect(image.state, `${image.stateReason}\n${log}`).toBe("READY");
    expect(log).toContain("ran\n");
    expect(log).toContain("no CMD or ENTRYPOINT");

    // FROM a Cocoon image: its disk and config (WORKDIR) carry over.
    const child = await upload(alice, "files-child", "FROM files\nRUN pwd > /where\n", makeZip([{ name: "x", data: "" }]));
    expect(child.status, child.text).toBe(202);
    const built = await waitBuilt(alice, child.body.imageId);
    expect(built.state, built.stateReason).toBe("READY");
    expect(built.parentImageId).toBe(image.imageId);

    const vm = (await api.call("POST", "/v1/microvms", { key: alice, body: { image: "files-child" } })).body;
    const out = await api.call("POST", `/v1/microvms/${vm.microVmId}/exec`, {
      key: alice,
      body: { command: "ls /app/txt; stat -c %U /app/owned/a.txt; ls /app/owned; head -c 20 /opt/vendor/app.py; echo; cat /where; test -e /.cocoon-build || echo clean" },
    });
    expect(out.body.stdout).toBe('a.txt\nb.txt\nnobody\na.txt\nb.txt\nrun.sh\n"""A tiny web app wh\n/app\nclean\n');
    expect((await api.call("DELETE", "/v1/images/files", { key: alice })).status).toBe(409); // files-child is built on it
    await api.call("DELETE", `/v1/microvms/${vm.microVmId}`, { key: alice });
    expect((await api.call("DELETE", "/v1/images/files-child", { key: alice })).status).toBe(200);
    expect((await api.call("DELETE", "/v1/images/files", { key: alice })).status).toBe(200);
  });
});

describe("hostile archives are refused before any build, naming the entry", () => {
  const zeros = Buffer.alloc(8 * 1024 * 1024);
  const cases: [string, Buffer, number, string][] = [
    ["zip slip", makeZip([{ name: "ok.txt", data: "x" }, { name: "a/../../etc/passwd", data: "x" }]), 400, 'entry "a/../../etc/passwd" has a ".." path component'],
    ["absolute path", makeZip([{ name: "/etc/cron.d/evil", data: "x" }]), 400, 'entry "/etc/cron.d/evil" has an absolute path'],
    ["symlink outside", makeZip([{ name: "link", symlink: "../../../etc/shadow" }]), 400, 'entry "link" is a symlink pointing outside the archive'],
    ["absolute symlink", makeZip([{ name: "abs", symlink: "/etc/shadow" }]), 400, 'entry "abs" is a symlink to an absolute path'],
    ["bomb ratio", makeZip([{ name: "zeros.bin", data: zeros, deflate: true }]), 400, 'entry "zeros.bin" expands'],
    ["too many entries", makeZip(Array.from({ length: 120 }, (_, i) => ({ name: `f${i}`, data: "x" }))), 400, "has 120 entries; the limit is 100"],
    ["not a zip", Buffer.from("definitely not a zip"), 400, "not a valid zip archive"],
  ];
  beforeAll(() => {
    (api.images as unknown as { limits: { maxEntries: number } }).limits.maxEntries = 100;
  });
  afterAll(() => {
    (api.images as unknown as { limits: { maxEntries: number } }).limits.maxEntries = 20_000;
  });
  it.each(cases)("%s", async (_name, zip, status, message) => {
    const res = await upload(alice, "hostile", tiny("true"), zip);
    expect(res.status, res.text).toBe(status);
    expect(res.body.error.code).toBe("ValidationError");
    expect(res.body.error.message).toContain(message);
    expect((await api.call("GET", "/v1/images?name=hostile", { key: alice })).body.images).toEqual([]);
  });
});

describe("Dockerfiles that cannot build", () => {
  it("refuses an unsupported instruction with its line number, before building", async () => {
    const res = await upload(alice, "bad", "FROM debian:bookworm\nRUN true\nVOLUME /data\n", tinyZip);
    expect(res.status, res.text).toBe(400);
    expect(res.body.error).toMatchObject({ code: "ValidationError", details: { field: "dockerfile", line: 3 } });
    expect(res.body.error.message).toContain("Dockerfile line 3: VOLUME is not supported");
    const from = await upload(alice, "bad", "FROM ubuntu:22.04\n", tinyZip);
    expect(from.body.error.message).toContain("Dockerfile line 1: FROM ubuntu:22.04");
    const url = await upload(alice, "bad", "FROM scratch\nADD https://example.com/x /x\n", tinyZip);
    expect(url.body.error.message).toContain("Dockerfile line 2: ADD from a URL");
  });

  it("fails a build whose RUN fails, with the line and the log, publishing nothing", async () => {
    const res = await upload(alice, "failing", "FROM debian:bookworm-slim\nRUN echo before-the-failure\nRUN echo oops >&2; exit 3\nCMD sleep 1000\n", tinyZip);
    expect(res.status, res.text).toBe(202);
    const image = await waitBuilt(alice, res.body.imageId);
    expect(image.state).toBe("FAILED");
    expect(image.stateReason).toBe("line 3: RUN echo oops >&2; exit 3 exited with code 3");
    const log = await buildLog(alice, image.imageId);
    expect(log).toContain("before-the-failure");
    expect(log).toContain("oops");
    expect(log).toContain("==> FAILED");
    const launch = await api.call("POST", "/v1/microvms", { key: alice, body: { image: "failing" } });
    expect(launch.status).toBe(409);
    expect(api.engine.list()).toEqual([]);
  });

  it("fails a build whose app never gets ready", async () => {
    const res = await upload(alice, "never-ready", "FROM debian:bookworm-slim\nHEALTHCHECK --interval=500ms --retries=3 CMD false\nCMD [\"sleep\", \"infinity\"]\n", tinyZip);
    expect(res.status, res.text).toBe(202);
    const image = await waitBuilt(alice, res.body.imageId);
    expect(image.state).toBe("FAILED");
    expect(image.stateReason).toContain("the app never became ready: HEALTHCHECK failed 3 times in a row");
    expect(api.engine.list()).toEqual([]);
  });
});
