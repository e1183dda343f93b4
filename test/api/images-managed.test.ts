import { describe, expect, it } from "vitest";
import { useApi } from "../support/api-fixture.ts";
import { makeZip } from "../support/zip.ts";

// python and node are built on first use (mmdebstrap, then a snapshot): only here.
const api = await useApi({ capacity: { vcpus: 8, memoryMiB: 4 * 1024 }, images: { readyTimeoutMs: 90_000, settleMs: 1500 } });
const alice = await api.tenantKey("alice", ["microvm:*", "image:*"]);

async function exec(vmId: string, command: string | string[]): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  return (await api.call("POST", `/v1/microvms/${vmId}/exec`, { key: alice, body: { command, timeoutSeconds: 120 } })).body;
}

async function launch(body: Record<string, unknown>): Promise<string> {
  const res = await api.call("POST", "/v1/microvms", { key: alice, body });
  expect(res.status, res.text).toBe(201);
  return res.body.microVmId as string;
}

describe("managed images", () => {
  it("lists base, python and node as managed and READY with the tenant's images, describes them, and refuses to delete or shadow them", async () => {
    const list = await api.call("GET", "/v1/images", { key: alice });
    expect(list.body.images.slice(0, 3)).toMatchObject([
      { imageId: "img-base", name: "base", managed: true, state: "READY", diskGiB: 4, packages: ["ca-certificates", "python3"] },
      { imageId: "img-python", name: "python", managed: true, state: "READY", packages: ["ca-certificates", "python3", "python3-pip", "python3-venv"] },
      { imageId: "img-node", name: "node", managed: true, state: "READY", packages: ["ca-certificates", "python3", "nodejs", "npm"] },
    ]);
    expect((await api.call("GET", "/v1/images?name=python", { key: alice })).body.images).toMatchObject([{ name: "python", managed: true }]);
    const base = await api.call("GET", "/v1/images/base", { key: alice });
    expect(base.status, base.text).toBe(200);
    expect(base.body).toMatchObject({ imageId: "img-base", state: "READY", managed: true });
    expect((await api.call("GET", "/v1/images/img-node", { key: alice })).body.name).toBe("node");
    const del = await api.call("DELETE", "/v1/images/base", { key: alice });
    expect(del.status).toBe(409);
    expect(del.body.error.message).toContain("managed by Cocoon");
    const form = new FormData();
    form.set("name", "python");
    form.set("dockerfile", "FROM base\n");
    form.set("code", new Blob([new Uint8Array(makeZip([{ name: "a", data: "1" }]))]), "code.zip");
    const shadow = await fetch(`${api.url}/v1/images`, { method: "POST", headers: { authorization: `Bearer ${alice}` }, body: form });
    expect(shadow.status).toBe(400);
    expect(((await shadow.json()) as { error: { message: string } }).error.message).toContain("reserved");
  });

  it("launches base with python3 and its root filesystem grown to diskGiB, within the limits", async () => {
    // Below the image's filesystem (the lifecycle), above the limit (the API's schema).
    for (const [diskGiB, field, message] of [
      [2, "diskGiB", "diskGiB must be at least 4 for image base"],
      [33, "body.diskGiB", "must be <= 32"],
    ] as const) {
      const res = await api.call("POST", "/v1/microvms", { key: alice, body: { image: "base", diskGiB } });
      expect(res.status, res.text).toBe(400);
      expect(res.body.error).toMatchObject({ code: "ValidationError", details: { field } });
      expect(res.body.error.message).toContain(message);
    }
    const id = await launch({ image: "base", diskGiB: 9 });
    expect((await api.call("GET", `/v1/microvms/${id}`, { key: alice })).body.diskGiB).toBe(9);
    expect((await exec(id, ["python3", "-c", "print(6 * 7)"])).stdout).toBe("42\n");
    const sizeGiB = async () => Number((await exec(id, "df -k / | tail -1")).stdout.trim().split(/\s+/)[1]) / 2 ** 20;
    expect(await sizeGiB()).toBeGreaterThan(8.5);
    expect(await sizeGiB()).toBeLessThanOrEqual(9);
    // The space is usable, and the size survives a suspend and resume.
    expect((await exec(id, "fallocate -l 6G /var/big && echo ok && rm /var/big")).stdout).toBe("ok\n");
    expect((await api.call("POST", `/v1/microvms/${id}/suspend`, { key: alice })).body.state).toBe("SUSPENDED");
    expect((await api.call("POST", `/v1/microvms/${id}/resume`, { key: alice })).body.state).toBe("RUNNING");
    expect(await sizeGiB()).toBeGreaterThan(8.5);
    // Without diskGiB: the image's size.
    const plain = await launch({ image: "base" });
    expect(Number((await exec(plain, "df -k / | tail -1")).stdout.trim().split(/\s+/)[1]) / 2 ** 20).toBeLessThanOrEqual(4);
    for (const vm of [id, plain]) await api.call("DELETE", `/v1/microvms/${vm}`, { key: alice });
  });

  it("builds python on its first launch: Debian's python3 with pip and venv", async () => {
    const id = await launch({ image: "python" });
    const out = await exec(id, "python3 -m venv /tmp/venv && /tmp/venv/bin/pip --version && python3 -c 'import ensurepip, venv; print(\"ok\")'");
    expect(out.exitCode, out.stderr).toBe(0);
    expect(out.stdout).toMatch(/^pip \d+/);
    expect(out.stdout).toContain("ok\n");
    await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });

  it("builds node on its first launch: Debian's nodejs and npm", async () => {
    const id = await launch({ image: "node" });
    const out = await exec(id, "node -e 'console.log(6 * 7)' && npm --version");
    expect(out.exitCode, out.stderr).toBe(0);
    expect(out.stdout).toMatch(/^42\n\d+\.\d+\.\d+\n$/);
    await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });
});

describe("a Dockerfile as people write it, FROM python", () => {
  it("builds SHELL, ARG, heredocs (script, #! and COPY), VOLUME and STOPSIGNAL, and serves", async () => {
    const dockerfile = [
      "# syntax=docker/dockerfile:1",
      "ARG VENV=/opt/venv",
      "FROM python",
      "ARG VENV",
      'SHELL ["/bin/bash", "-o", "pipefail", "-c"]',
      "WORKDIR /srv",
      "RUN python3 -m venv $VENV && $VENV/bin/pip --version | cut -d' ' -f1 > /srv/pip.txt",
      "RUN <<EOF",
      "set -e",
      'echo "a heredoc run by ${BASH_VERSION:+bash}" > /srv/heredoc.txt',
      "EOF",
      "RUN <<'PY'",
      "#!/usr/bin/env python3",
      "open('/srv/shebang.txt', 'w').write('python ran this\\n')",
      "PY",
      "ENV WHO=cocoon",
      "COPY <<EOF /srv/index.html",
      "hello from $WHO",
      "EOF",
      "COPY hello.txt .",
      "VOLUME /data",
      "STOPSIGNAL SIGINT",
      "EXPOSE 8000",
      'CMD ["/opt/venv/bin/python", "-m", "http.server", "8000", "--directory", "/srv"]',
    ].join("\n");
    const form = new FormData();
    form.set("name", "pyapp");
    form.set("dockerfile", dockerfile);
    form.set("code", new Blob([new Uint8Array(makeZip([{ name: "hello.txt", data: "from the archive\n" }]))]), "code.zip");
    const created = await fetch(`${api.url}/v1/images`, { method: "POST", headers: { authorization: `Bearer ${alice}` }, body: form });
    const body = (await created.json()) as { imageId: string };
    expect(created.status, JSON.stringify(body)).toBe(202);
    let image: Record<string, any>;
    for (;;) {
      image = (await api.call("GET", `/v1/images/${body.imageId}`, { key: alice })).body;
      if (image.state !== "BUILDING") break;
      await new Promise((r) => setTimeout(r, 500));
    }
    const log = (await api.call("GET", `/v1/images/${body.imageId}/build-log`, { key: alice })).text;
    expect(image.state, `${image.stateReason}\n${log}`).toBe("READY");
    expect(image).toMatchObject({ appPort: 8000, volumes: ["/data"], stopSignal: "SIGINT", diskGiB: 4 });
    const id = await launch({ image: "pyapp" });
    expect((await exec(id, "cat /srv/pip.txt /srv/heredoc.txt /srv/shebang.txt /srv/index.html /srv/hello.txt; test -d /data && echo volume")).stdout).toBe(
      "pip\na heredoc run by bash\npython ran this\nhello from cocoon\nfrom the archive\nvolume\n",
    );
    const port = api.engine.get(id).hostPort(8000);
    expect(await (await fetch(`http://127.0.0.1:${port}/index.html`)).text()).toBe("hello from cocoon\n");
    await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });
});
