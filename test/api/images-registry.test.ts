import { access, mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RegistryEgress } from "../../src/images/registry/egress.ts";
import { useApi } from "../support/api-fixture.ts";
import { TEST_ROOT } from "../support/paths.ts";
import { busyboxLayer, startRegistry, writeOciImage, writeOciIndex, type LayerEntry } from "../support/registry.ts";
import { makeZip } from "../support/zip.ts";

// A registry of our own on loopback: TLS from a test CA (trusted through the
// server's registry CA setting, verification on) and basic auth on every
// repository. The images are made here, small, and pushed once for the file.
const work = await mkdtemp(join(TEST_ROOT, "registry-"));
const registry = await startRegistry(join(work, "registry"));
afterAll(async () => {
  await registry.close();
  await rm(work, { recursive: true, force: true });
});
// Pulls (layer cache, disks) go to an assets directory of this file's own: every run pulls cold.
const api = await useApi({
  capacity: { vcpus: 8, memoryMiB: 4 * 1024 },
  images: { assetsDir: join(work, "assets"), registryCaFile: registry.caFile, registryPrivateAllow: RegistryEgress.allowFromEnv({ COCOON_REGISTRY_PRIVATE_ALLOW: "127.0.0.1" }), readyTimeoutMs: 90_000, settleMs: 1500 },
});
const alice = await api.tenantKey("alice", ["microvm:*", "image:*"]);
const bob = await api.tenantKey("bob", ["microvm:*", "image:*"]);
const R = registry.host;

const busybox = await busyboxLayer();
const layout = join(work, "layout");
const bbConfig = {
  Env: ["PATH=/bin", "GREETING=hi", "ARCH=amd64"],
  WorkingDir: "/srv",
  Cmd: ["httpd", "-f", "-p", "8080", "-h", "/srv"],
  ExposedPorts: { "8080/tcp": {} },
  StopSignal: "SIGINT",
  Labels: { "org.opencontainers.image.title": "bb" },
};
// Three layers: busybox; files; a whiteout of /etc/motd and an opaque /srv/old.
const bbLayers: LayerEntry[][] = [
  busybox,
  [
    { name: "etc/motd", data: "old motd\n" },
    { name: "srv/old/", type: "directory" },
    { name: "srv/old/a.txt", data: "a\n" },
    { name: "srv/keep.txt", data: "kept\n" },
  ],
  [
    { name: "etc/.wh.motd" },
    { name: "srv/old/.wh..wh..opq" },
    { name: "srv/old/b.txt", data: "b\n" },
  ],
];
const amd64 = await writeOciImage(layout, "bb", { layers: bbLayers, config: bbConfig });
// Another platform of the same name: its config says so, and its files are not busybox.
const arm64 = await writeOciImage(layout, undefined, { layers: [[{ name: "etc/arch", data: "arm64\n" }]], config: { ...bbConfig, Env: ["PATH=/bin", "ARCH=arm64"] }, architecture: "arm64" });
await writeOciIndex(layout, "multi", [
  { blob: arm64, architecture: "arm64" },
  { blob: amd64, architecture: "amd64" },
]);
await writeOciImage(layout, "escape", { layers: [busybox, [{ name: "../../../../tmp/cocoon-escaped-by-a-layer", data: "pwned\n" }]], config: bbConfig });
await writeOciImage(layout, "device", { layers: [busybox, [{ name: "srv/disk", type: "block-device" }]], config: bbConfig });
await registry.push(layout, "bb", "private/bb:1");
await registry.push(layout, "multi", "private/multi:1");
await registry.push(layout, "escape", "hostile/escape:1");
await registry.push(layout, "device", "hostile/device:1");

const zip = makeZip([{ name: "hello.txt", data: "hi\n" }]);

async function create(key: string, name: string, dockerfile: string, extra: Record<string, unknown> = {}) {
  const form = new FormData();
  form.set("name", name);
  form.set("dockerfile", dockerfile);
  for (const [k, v] of Object.entries(extra)) form.set(k, String(v));
  form.set("code", new Blob([new Uint8Array(zip)], { type: "application/zip" }), "code.zip");
  const res = await fetch(`${api.url}/v1/images`, { method: "POST", headers: { authorization: `Bearer ${key}` }, body: form });
  const text = await res.text();
  return { status: res.status, body: JSON.parse(text), text };
}

async function built(key: string, imageId: string): Promise<Record<string, any>> {
  const deadline = Date.now() + 600_000;
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

async function exec(key: string, vmId: string, command: string): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  return (await api.call("POST", `/v1/microvms/${vmId}/exec`, { key, body: { command } })).body;
}

describe("registry credentials", () => {
  it("fails a private image without credentials, naming the registry's authentication and the API to fix it", async () => {
    const res = await create(alice, "no-creds", `FROM ${R}/private/bb:1\n`);
    expect(res.status, res.text).toBe(202);
    const image = await built(alice, res.body.imageId);
    expect(image.state).toBe("FAILED");
    expect(image.stateReason).toContain(`FROM ${R}/private/bb:1: registry ${R} requires authentication and no credentials are stored for it: add them with PUT /v1/registries/${R}`);
  });

  it("stores credentials per tenant, never shows the password, refuses bad hosts, and a wrong password fails the build naming it", async () => {
    const bad = await api.call("PUT", `/v1/registries/${encodeURIComponent(R)}`, { key: alice, body: { username: registry.username, password: "wrong" } });
    expect(bad.status, bad.text).toBe(200);
    const wrong = await built(alice, (await create(alice, "wrong-creds", `FROM ${R}/private/bb:1\n`)).body.imageId);
    expect(wrong.stateReason).toContain(`registry ${R} refused the credentials stored for it`);

    const put = await api.call("PUT", `/v1/registries/${encodeURIComponent(R)}`, { key: alice, body: { username: registry.username, password: registry.password } });
    expect(put.body).toEqual({ host: R, username: registry.username, createdAt: expect.any(String), updatedAt: expect.any(String) });
    const list = await api.call("GET", "/v1/registries", { key: alice });
    expect(list.body.registries).toHaveLength(1);
    expect(list.text).not.toContain(registry.password);
    expect((await api.call("GET", "/v1/registries", { key: bob })).body.registries).toEqual([]);
    expect((await api.call("GET", `/v1/registries/${R}`, { key: bob })).status).toBe(404);
    const badHost = await api.call("PUT", "/v1/registries/not%20a%20host", { key: alice, body: { username: "u", password: "p" } });
    expect(badHost.status).toBe(400);
    expect(badHost.body.error.details).toEqual({ field: "host" });
    const reader = await api.tenantKey("carol", ["image:read"]);
    expect((await api.call("PUT", `/v1/registries/${R}`, { key: reader, body: { username: "u", password: "p" } })).status).toBe(403);
  });
});

describe("FROM a registry image", () => {
  let image: Record<string, any>;
  beforeAll(async () => {
    const res = await create(alice, "from-registry", `FROM ${R}/private/bb:1\nRUN echo built-$GREETING > /srv/built.txt\n`);
    expect(res.status, res.text).toBe(202);
    image = await built(alice, res.body.imageId);
  }, 900_000);

  it("pulls with progress in the build log, applies the layers in order (whiteouts, opaque dirs) and the image config", async () => {
    const log = await buildLog(alice, image.imageId);
    expect(image.state, `${image.stateReason}\n${log}`).toBe("READY");
    expect(image).toMatchObject({ appPort: 8080, stopSignal: "SIGINT", command: ["httpd", "-f", "-p", "8080", "-h", "/srv"], labels: { "org.opencontainers.image.title": "bb" }, diskGiB: 4 });
    expect(log).toContain(`==> FROM ${R}/private/bb:1: ${amd64.digest} (linux/amd64), 3 layers`);
    expect(log).toMatch(/skopeo: Copying blob sha256:[0-9a-f]{64}/);
    expect(log).toContain("checking 3 layers before unpacking");

    const vm = await api.call("POST", "/v1/microvms", { key: alice, body: { image: "from-registry", diskGiB: 6 } });
    expect(vm.status, vm.text).toBe(201);
    const id = vm.body.microVmId;
    expect((await exec(alice, id, "cat /srv/built.txt /srv/keep.txt; ls /srv/old; test -e /etc/motd || echo no-motd; echo $GREETING")).stdout).toBe("built-hi\nkept\nb.txt\nno-motd\nhi\n");
    // The app (the image's CMD) serves on its EXPOSEd port.
    const port = api.engine.get(id).hostPort(8080);
    expect(await (await fetch(`http://127.0.0.1:${port}/keep.txt`)).text()).toBe("kept\n");
    // diskGiB: the root filesystem was grown from the image's 4 GiB, online.
    const df = (await exec(alice, id, "df -k / | tail -1")).stdout.trim().split(/\s+/);
    expect(Number(df[1]) / 2 ** 20).toBeGreaterThan(5.5);
    expect(Number(df[1]) / 2 ** 20).toBeLessThanOrEqual(6);
    await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });

  it("does not let another tenant use the cached image without its own access to the registry", async () => {
    const res = await create(bob, "borrowed", `FROM ${R}/private/bb:1\n`);
    const failed = await built(bob, res.body.imageId);
    expect(failed.state).toBe("FAILED");
    expect(failed.stateReason).toContain("requires authentication");
  });
});

describe("a multi-stage Dockerfile", () => {
  it("builds a stage FROM a manifest list (the host's platform), copies its output and a file of another image into a scratch image", async () => {
    const dockerfile = [
      `FROM ${R}/private/multi:1 AS build`,
      "RUN mkdir -p /out/bin && echo from-$ARCH > /out/artifact.txt && cp /bin/busybox /out/bin/busybox",
      "FROM scratch",
      "COPY --from=build /out/ /",
      `COPY --from=${R}/private/bb:1 /srv/keep.txt /www/keep.txt`,
      'CMD ["/bin/busybox", "httpd", "-f", "-p", "8081", "-h", "/www"]',
      "EXPOSE 8081",
    ].join("\n");
    const res = await create(alice, "multi-stage", dockerfile);
    expect(res.status, res.text).toBe(202);
    const image = await built(alice, res.body.imageId);
    const log = await buildLog(alice, image.imageId);
    expect(image.state, `${image.stateReason}\n${log}`).toBe("READY");
    expect(log).toContain(`==> FROM ${R}/private/multi:1: ${amd64.digest} (linux/amd64)`);
    expect(log).toContain("==> stage build: exporting /out\n");
    const vm = await api.call("POST", "/v1/microvms", { key: alice, body: { image: "multi-stage" } });
    expect(vm.status, vm.text).toBe(201);
    const id = vm.body.microVmId;
    const run = (argv: string[]) => api.call("POST", `/v1/microvms/${id}/exec`, { key: alice, body: { command: argv } });
    expect((await run(["/bin/busybox", "cat", "/artifact.txt", "/www/keep.txt"])).body.stdout).toBe("from-amd64\nkept\n");
    // Nothing of the build stage but what was copied: no shell in the image.
    expect((await run(["/bin/busybox", "ls", "/"])).body.stdout.split(/\s+/).filter(Boolean).sort()).toEqual(["artifact.txt", "bin", "dev", "etc", "lost+found", "proc", "root", "run", "sys", "tmp", "www"]);
    const port = api.engine.get(id).hostPort(8081);
    expect(await (await fetch(`http://127.0.0.1:${port}/keep.txt`)).text()).toBe("kept\n");
    await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });
});

describe("hostile registries and layers", () => {
  it("refuses a layer with a path escaping the root, and one with a device node outside /dev, before unpacking anything", async () => {
    const escape = await built(alice, (await create(alice, "escape", `FROM ${R}/hostile/escape:1\n`)).body.imageId);
    expect(escape.state).toBe("FAILED");
    expect(escape.stateReason).toMatch(/layer 2 \(sha256:[0-9a-f]{12}\): entry "\.\.\/\.\.\/\.\.\/\.\.\/tmp\/cocoon-escaped-by-a-layer" has a "\.\." path component/);
    await expect(access("/tmp/cocoon-escaped-by-a-layer")).rejects.toThrow();
    const device = await built(alice, (await create(alice, "device", `FROM ${R}/hostile/device:1\n`)).body.imageId);
    expect(device.stateReason).toContain('entry "srv/disk" is a device node outside /dev');
  });

  it("refuses registries at host and private addresses the operator did not allow, before any build", async () => {
    // Names that resolve there are refused by the egress proxy: test/unit/images-registry.test.ts.
    const cases = [
      ["127.0.0.2:5000/x:1", "127.0.0.2:5000/x:1", "127.0.0.2"],
      ["10.255.255.1:5000/x", "10.255.255.1:5000/x:latest", "10.255.255.1"],
    ] as const;
    for (const [from, reference, address] of cases) {
      const res = await create(alice, "refused", `FROM ${from}\n`);
      expect(res.status, res.text).toBe(400);
      expect(res.body.error.message).toBe(`Dockerfile line 1: FROM ${reference}: ${address} is a host, private or link-local address (allow it with COCOON_REGISTRY_PRIVATE_ALLOW)`);
    }
  });
});
