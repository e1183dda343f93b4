import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { createServer, type Server } from "node:net";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import tar from "tar-stream";
import { afterAll, describe, expect, it } from "vitest";
import { configFromOci } from "../../src/images/registry/config.ts";
import { RegistryCredentials } from "../../src/images/registry/credentials.ts";
import { RegistryEgress } from "../../src/images/registry/egress.ts";
import { checkLayer, DEFAULT_PULL_LIMITS, type LayerTally } from "../../src/images/registry/layers.ts";
import { parseManifest, selectPlatform, type Descriptor } from "../../src/images/registry/manifest.ts";
import { RegistryPuller, skopeoReason } from "../../src/images/registry/puller.ts";
import { formatReference, normalizeRegistryHost, parseImageReference } from "../../src/images/registry/reference.ts";
import { openDatabase } from "../../src/store/db.ts";
import { createTenant } from "../../src/store/tenants.ts";

const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});
async function tempDir(): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), "cocoon-registry-"));
  dirs.push(d);
  return d;
}

/** The operator setting as the server reads it. */
const cidrs = (list: string) => RegistryEgress.allowFromEnv({ COCOON_REGISTRY_PRIVATE_ALLOW: list });

describe("image references", () => {
  const cases: [string, string][] = [
    ["python", "docker.io/library/python:latest"],
    ["python:3.12-slim", "docker.io/library/python:3.12-slim"],
    ["library/node:20", "docker.io/library/node:20"],
    ["bitnami/redis", "docker.io/bitnami/redis:latest"],
    ["docker.io/library/debian:bookworm", "docker.io/library/debian:bookworm"],
    ["index.docker.io/library/debian", "docker.io/library/debian:latest"],
    ["ghcr.io/acme/app/api:v1.2", "ghcr.io/acme/app/api:v1.2"],
    ["GHCR.io/acme/app", "ghcr.io/acme/app:latest"],
    ["localhost:5000/x", "localhost:5000/x:latest"],
    ["127.0.0.1:5443/a/b_c__d-e.f", "127.0.0.1:5443/a/b_c__d-e.f:latest"],
    [`alpine@sha256:${"0".repeat(64)}`, `docker.io/library/alpine@sha256:${"0".repeat(64)}`],
    [`alpine:3.20@sha256:${"0".repeat(64)}`, `docker.io/library/alpine:3.20@sha256:${"0".repeat(64)}`],
  ];
  it.each(cases)("reads %s as %s", (text, full) => {
    expect(formatReference(parseImageReference(text)!)).toBe(full);
  });

  it.each(["", "Python", "a//b", "a:b:c", "-x", "x@sha256:abc", "x@md5:" + "0".repeat(32), "host:99999/x", "a/b:-tag", "x".repeat(300), "ghcr.io/../etc", "a b"])("refuses %j", (text) => {
    expect(parseImageReference(text)).toBeUndefined();
  });

  it("normalises registry hosts as credentials store them", () => {
    expect(normalizeRegistryHost("https://Index.Docker.io/")).toBe("docker.io");
    expect(normalizeRegistryHost("registry.example.com:5000")).toBe("registry.example.com:5000");
    expect(normalizeRegistryHost("bad host")).toBeUndefined();
    expect(normalizeRegistryHost("x:0")).toBeUndefined();
  });
});

describe("manifests", () => {
  const d = (platform: Descriptor["platform"], n: string, annotations?: Record<string, string>): Descriptor => ({
    mediaType: "application/vnd.oci.image.manifest.v1+json",
    digest: `sha256:${n.repeat(64)}`,
    size: 100,
    platform,
    annotations,
  });

  it("picks the host's platform from a manifest list, skipping attestations and preferring no variant", () => {
    const list = [
      d({ os: "unknown", architecture: "unknown" }, "1", { "vnd.docker.reference.type": "attestation-manifest" }),
      d({ os: "linux", architecture: "arm64", variant: "v8" }, "2"),
      d({ os: "linux", architecture: "amd64", variant: "v3" }, "3"),
      d({ os: "linux", architecture: "amd64" }, "4"),
    ];
    expect(selectPlatform(list, { os: "linux", architecture: "amd64" }).digest).toBe(`sha256:${"4".repeat(64)}`);
    expect(() => selectPlatform(list.slice(0, 2), { os: "linux", architecture: "amd64" })).toThrow("has no linux/amd64 variant (it has linux/arm64/v8)");
  });

  it("reads OCI and Docker manifests, with or without mediaType, and refuses schema 1 and junk", () => {
    const layer = { mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: `sha256:${"a".repeat(64)}`, size: 10 };
    const image = { schemaVersion: 2, config: { ...layer, mediaType: "application/vnd.oci.image.config.v1+json" }, layers: [layer] };
    expect(parseManifest(JSON.stringify(image))).toMatchObject({ kind: "image", manifest: { layers: [{ size: 10 }] } });
    expect(parseManifest(JSON.stringify({ schemaVersion: 2, mediaType: "application/vnd.docker.distribution.manifest.list.v2+json", manifests: [] }))).toEqual({ kind: "index", manifests: [] });
    expect(() => parseManifest(JSON.stringify({ schemaVersion: 1, fsLayers: [] }))).toThrow("schema 1 manifest");
    expect(() => parseManifest("{")).toThrow("not JSON");
    expect(() => parseManifest(JSON.stringify({ ...image, layers: [{ ...layer, digest: "sha256:../../etc/passwd" }] }))).toThrow("layers[0] has no sha256 digest");
    expect(() => parseManifest(JSON.stringify({ ...image, layers: [{ ...layer, size: -1 }] }))).toThrow("no valid size");
  });
});

describe("image configs", () => {
  it("applies Env, WorkingDir, User, Entrypoint, Cmd, ExposedPorts, Healthcheck, StopSignal, Volumes, Shell and Labels", () => {
    const config = configFromOci({
      architecture: "amd64",
      config: {
        Env: ["PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8", "EMPTY="],
        WorkingDir: "/srv",
        User: "1000:1000",
        Entrypoint: ["docker-entrypoint.sh"],
        Cmd: ["node", "server.js"],
        ExposedPorts: { "53/udp": {}, "9090/tcp": {}, "8080/tcp": {} },
        Healthcheck: { Test: ["CMD-SHELL", "curl -f localhost:8080"], Interval: 5e9, Timeout: 2e9, Retries: 4 },
        StopSignal: "SIGQUIT",
        Volumes: { "/data": {} },
        Shell: ["/bin/bash", "-c"],
        Labels: { "org.opencontainers.image.source": "https://example.com" },
      },
    });
    expect(config).toEqual({
      env: { PATH: "/usr/local/bin:/usr/bin", LANG: "C.UTF-8", EMPTY: "" },
      workdir: "/srv",
      user: "1000",
      entrypoint: ["docker-entrypoint.sh"],
      cmd: ["node", "server.js"],
      argv: ["docker-entrypoint.sh", "node", "server.js"],
      appPort: 8080,
      healthcheck: { command: "curl -f localhost:8080", intervalMs: 5000, timeoutMs: 2000, startPeriodMs: 0, retries: 4 },
      stopSignal: "SIGQUIT",
      volumes: ["/data"],
      shell: ["/bin/bash", "-c"],
      labels: { "org.opencontainers.image.source": "https://example.com" },
    });
    expect(configFromOci({ config: { Healthcheck: { Test: ["CMD", "/health"] } } }).healthcheck?.command).toEqual(["/health"]);
    expect(configFromOci({ config: { Healthcheck: { Test: ["NONE"] } } }).healthcheck).toBeUndefined();
    expect(configFromOci({})).toMatchObject({ env: {}, workdir: "/", user: "root", argv: [] });
  });

  it.each([
    [{ config: { Env: "PATH=/bin" } }, "Env is not a list"],
    [{ config: { Env: ["novalue"] } }, 'Env entry "novalue" is not NAME=value'],
    [{ config: { Cmd: [1] } }, "Cmd is not a list"],
    [{ config: { User: { root: true } } }, "User is not a string"],
    [{ config: { Healthcheck: { Test: ["RUN", "x"] } } }, "Healthcheck.Test starts with"],
    [[], "config is not an object"],
  ])("refuses a malformed config %j", (blob, message) => {
    expect(() => configFromOci(blob)).toThrow(message);
  });
});

/** A gzipped layer tar from tar-stream headers (data for files). */
async function layer(entries: (tar.Header | { name: string; type?: string; data?: Buffer | string; linkname?: string; pax?: Record<string, string> })[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const done = new Promise<void>((resolve, reject) => {
    pack.on("data", (c) => chunks.push(c as Buffer));
    pack.on("end", resolve);
    pack.on("error", reject);
  });
  for (const e of entries) {
    const { data, ...header } = e as { data?: Buffer | string } & tar.Header;
    await new Promise<void>((resolve, reject) => pack.entry({ ...header, mode: header.mode ?? 0o644 }, data ?? "", (err) => (err ? reject(err) : resolve())));
  }
  pack.finalize();
  await done;
  return gzipSync(Buffer.concat(chunks));
}

describe("layer checks", () => {
  const gz = "application/vnd.oci.image.layer.v1.tar+gzip";
  async function check(entries: Parameters<typeof layer>[0], limits = DEFAULT_PULL_LIMITS, tally: LayerTally = { entries: 0, bytes: 0 }) {
    const dir = await tempDir();
    const blob = await layer(entries);
    await writeFile(join(dir, "blob"), blob);
    await checkLayer(join(dir, "blob"), gz, blob.length, "1", limits, tally);
    return tally;
  }

  it("accepts a root filesystem: absolute symlinks, setuid files, whiteouts, opaque directories, hard links inside, device nodes in /dev", async () => {
    const tally = await check([
      { name: "./", type: "directory" },
      { name: "bin/", type: "directory" },
      { name: "bin/su", data: "x", mode: 0o4755 },
      { name: "bin/sh", type: "symlink", linkname: "/bin/busybox" },
      { name: "bin/ln", type: "link", linkname: "bin/su" },
      { name: "etc/.wh.motd" },
      { name: "var/cache/.wh..wh..opq" },
      { name: "run/fifo", type: "fifo" },
      // As debootstrap and mmdebstrap leave them; hidden by the guest's devtmpfs.
      { name: "./dev/console", type: "character-device" },
      { name: "dev/loop0", type: "block-device" },
    ]);
    expect(tally).toEqual({ entries: 10, bytes: 1 });
  });

  it.each([
    [[{ name: "../../etc/cron.d/evil", data: "x" }], 'entry "../../etc/cron.d/evil" has a ".." path component'],
    [[{ name: "usr/../../x", data: "x" }], '".." path component'],
    [[{ name: "srv/sda", type: "block-device" }], "is a device node outside /dev"],
    [[{ name: "./home/app/mem", type: "character-device" }], "is a device node outside /dev"],
    [[{ name: "dev/../srv/mem", type: "character-device" }], '".." path component'],
    [[{ name: "bin/x", type: "link", linkname: "../../../etc/shadow" }], "is a hard link to"],
    [[{ name: "big", data: "x", pax: { "GNU.sparse.major": "1", "GNU.sparse.realsize": "99999999999" } }], "is a sparse file"],
  ])("refuses %j", async (entries, message) => {
    await expect(check(entries)).rejects.toThrow(message);
  });

  it("refuses a tar bomb (ratio), an image past its entry and size budgets, and a layer that is not a tar", async () => {
    await expect(check([{ name: "zeros", data: Buffer.alloc(8 * 2 ** 20) }])).rejects.toThrow(/expand \d+:1 \(limit 100:1\): a tar bomb/);
    await expect(check([{ name: "a", data: "1" }, { name: "b", data: "2" }], { ...DEFAULT_PULL_LIMITS, maxEntries: 1 })).rejects.toThrow("past 1 entries");
    // The budget spans the image's layers.
    await expect(check([{ name: "c", data: "12345" }], { ...DEFAULT_PULL_LIMITS, maxUncompressedBytes: 10 }, { entries: 3, bytes: 8 })).rejects.toThrow("uncompressed limit of 10 bytes");
    const dir = await tempDir();
    await writeFile(join(dir, "junk"), gzipSync("not a tar at all, but long enough to read a header from ".repeat(20)));
    await expect(checkLayer(join(dir, "junk"), gz, 100, "1", DEFAULT_PULL_LIMITS, { entries: 0, bytes: 0 })).rejects.toThrow("is not a readable gzip tar");
    await expect(checkLayer(join(dir, "junk"), "application/vnd.oci.image.layer.v1.tar+zstd", 100, "1", DEFAULT_PULL_LIMITS, { entries: 0, bytes: 0 })).rejects.toThrow("zstd");
  });
});

describe("skopeo's failures, in words", () => {
  const none = { auths: {} };
  const some = { auths: { "r.example": { auth: "x" } } };
  it("names registry authentication, not found, TLS and the egress guard", () => {
    const unauthorized = 'time="…" level=fatal msg="Error parsing image name \\"docker://r.example/x:1\\": reading manifest 1 in r.example/x: unauthorized: authentication required"';
    expect(skopeoReason(unauthorized, "r.example", none)).toMatch(/^registry r.example requires authentication and no credentials are stored for it: add them with PUT \/v1\/registries\/r.example/);
    expect(skopeoReason(unauthorized, "r.example", some)).toMatch(/^registry r.example refused the credentials stored for it/);
    expect(skopeoReason('level=fatal msg="reading manifest 2 in r.example/x: manifest unknown: manifest unknown"', "r.example", none)).toMatch(/^not found in registry r.example/);
    expect(skopeoReason('level=fatal msg="pinging container registry r.example: Get \\"https://r.example/v2/\\": x509: certificate signed by unknown authority"', "r.example", none)).toContain("COCOON_REGISTRY_CA_FILE");
    const guarded = 'level=fatal msg="pinging container registry r.example: Get \\"https://r.example/v2/\\": registry r.example refused: 10.0.0.1 is a host, private or link-local address (allow it with COCOON_REGISTRY_PRIVATE_ALLOW)"';
    expect(skopeoReason(guarded, "r.example", none)).toContain("10.0.0.1 is a host, private or link-local address");
  });
});

describe("registry egress", () => {
  it("refuses host, private and link-local addresses unless allowed", () => {
    const egress = new RegistryEgress(cidrs("10.9.0.0/16,127.0.0.1"));
    expect(egress.refusal("10.1.2.3")).toContain("COCOON_REGISTRY_PRIVATE_ALLOW");
    expect(egress.refusal("169.254.169.254")).toBeDefined();
    expect(egress.refusal("::1")).toBeDefined();
    expect(egress.refusal("::ffff:192.168.1.1")).toBeDefined();
    expect(egress.refusal("fd00::1")).toBeDefined();
    expect(egress.refusal("10.9.1.1")).toBeUndefined();
    expect(egress.refusal("140.82.112.3")).toBeUndefined();
    expect(egress.checkHost("127.0.0.1:5000")).toBeUndefined();
    expect(egress.checkHost("127.0.0.2:5000")).toBeDefined();
    expect(new RegistryEgress().checkHost("localhost:5000")).toBeDefined();
    expect(new RegistryEgress().checkHost("ghcr.io")).toBeUndefined();
    expect(() => RegistryEgress.allowFromEnv({ COCOON_REGISTRY_PRIVATE_ALLOW: "10.0.0.0/8, nope" })).toThrow('COCOON_REGISTRY_PRIVATE_ALLOW: "nope" is not a CIDR');
  });

  it("is a CONNECT proxy that needs its token and connects only where it may", async () => {
    const upstream: Server = createServer((s) => s.end("hello through the proxy"));
    await new Promise<void>((r) => upstream.listen(0, "127.0.0.1", r));
    const port = (upstream.address() as { port: number }).port;
    const open = new RegistryEgress(cidrs("127.0.0.1"));
    const closed = new RegistryEgress();
    const connect = async (egress: RegistryEgress, target: string, auth = true) => {
      const url = new URL(await egress.proxyUrl());
      return new Promise<{ status: number; message: string; body: string }>((resolve, reject) => {
        const headers = auth ? { "proxy-authorization": `Basic ${Buffer.from(`${url.username}:${url.password}`).toString("base64")}` } : {};
        const req = request({ host: url.hostname, port: url.port, method: "CONNECT", path: target, headers });
        req.on("connect", (res, socket, head) => {
          let body = head.toString();
          socket.on("data", (d) => (body += d.toString()));
          socket.on("end", () => resolve({ status: res.statusCode!, message: res.statusMessage!, body }));
        });
        req.on("error", reject);
        req.end();
      });
    };
    try {
      expect(await connect(open, `127.0.0.1:${port}`)).toMatchObject({ status: 200, body: "hello through the proxy" });
      expect(await connect(open, `127.0.0.1:${port}`, false)).toMatchObject({ status: 407 });
      const refused = await connect(closed, `127.0.0.1:${port}`);
      expect(refused.status).toBe(403);
      expect(refused.message).toContain("127.0.0.1 is a host, private or link-local address");
      expect((await connect(closed, "169.254.169.254:443")).status).toBe(403);
    } finally {
      await open.close();
      await closed.close();
      upstream.close();
    }
  });
});

describe("skopeo through the egress proxy", () => {
  it("cannot reach a registry whose name resolves to a private address: the proxy refuses, and the build is told why", async () => {
    const dir = await tempDir();
    const egress = new RegistryEgress([], async (host) => (host === "registry.internal.test" ? ["10.1.2.3"] : []));
    const puller = new RegistryPuller({ assetsDir: dir, egress, limits: DEFAULT_PULL_LIMITS });
    try {
      const pull = puller.pull({ ref: parseImageReference("registry.internal.test/team/app:1")!, auth: { auths: {} }, log: () => undefined, signal: AbortSignal.timeout(60_000) });
      await expect(pull).rejects.toThrow("FROM registry.internal.test/team/app:1: ");
      await expect(pull).rejects.toThrow("registry registry.internal.test refused: 10.1.2.3 is a host, private or link-local address (allow it with COCOON_REGISTRY_PRIVATE_ALLOW)");
    } finally {
      await egress.close();
    }
  });
});

describe("pull work directories", () => {
  it("removes those of servers no longer running, keeps its own", async () => {
    const dir = await tempDir();
    const work = join(dir, "oci", "work");
    for (const d of [`pull-${process.pid}-mine`, "pull-2147483646-gone", "pull-x-junk"]) await mkdir(join(work, d), { recursive: true });
    await new RegistryPuller({ assetsDir: dir, egress: new RegistryEgress(), limits: DEFAULT_PULL_LIMITS }).removeStale();
    expect(await readdir(work)).toEqual([`pull-${process.pid}-mine`]);
  });
});

describe("registry credentials", () => {
  it("stores passwords sealed, never returns them, writes auth files per tenant, and refuses a sealed password moved to another tenant", async () => {
    const dir = await tempDir();
    const db = await openDatabase(dir);
    try {
      const a = await createTenant(db, "a");
      const b = await createTenant(db, "b");
      const creds = new RegistryCredentials(db, join(dir, "credentials.key"));
      const view = await creds.put(a.id, "GHCR.io", "alice", "s3cret-token");
      expect(view).toEqual({ host: "ghcr.io", username: "alice", createdAt: expect.any(String), updatedAt: expect.any(String) });
      expect(JSON.stringify(await creds.list(a.id))).not.toContain("s3cret");
      expect(await creds.list(b.id)).toEqual([]);
      const row = await db.selectFrom("registry_credentials").selectAll().executeTakeFirstOrThrow();
      expect(row.password_sealed).not.toContain("s3cret");
      expect(row.password_sealed).toMatch(/^v1\./);
      expect((await creds.authFile(a.id, ["ghcr.io", "docker.io"])).auths).toEqual({ "ghcr.io": { auth: Buffer.from("alice:s3cret-token").toString("base64") } });
      expect((await creds.authFile(b.id, ["ghcr.io"])).auths).toEqual({});
      // Another server instance reads the same key file.
      expect((await new RegistryCredentials(db, join(dir, "credentials.key")).authFile(a.id, ["ghcr.io"])).auths["ghcr.io"]).toBeDefined();
      // A sealed password copied into another tenant's row does not open.
      await db.insertInto("registry_credentials").values({ ...row, tenant_id: b.id }).execute();
      await expect(creds.authFile(b.id, ["ghcr.io"])).rejects.toThrow("do not open");
      await expect(creds.put(a.id, "not a host", "u", "p")).rejects.toMatchObject({ code: "ValidationError", details: { field: "host" } });
      await expect(creds.put(a.id, "x.io", "a:b", "p")).rejects.toMatchObject({ details: { field: "username" } });
      await creds.delete(a.id, "ghcr.io");
      await expect(creds.get(a.id, "ghcr.io")).rejects.toMatchObject({ code: "NotFound" });
    } finally {
      await db.destroy();
    }
  });
});
