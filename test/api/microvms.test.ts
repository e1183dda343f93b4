import { createHash, randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { useApi } from "../support/api-fixture.ts";

// Host capacity of 10 VMs of the default shape (1 vCPU, 512 MiB).
const api = await useApi({ capacity: { vcpus: 10, memoryMiB: 10 * 512 } });
const alice = await api.tenantKey("alice");
const bob = await api.tenantKey("bob");

async function createVm(key = alice, body: Record<string, unknown> = {}) {
  const res = await api.call("POST", "/v1/microvms", { key, body: { image: "base", ...body } });
  expect(res.status, res.text).toBe(201);
  return res.body as { microVmId: string; state: string };
}

describe("health and OpenAPI", () => {
  it("answer without a key", async () => {
    expect((await api.call("GET", "/v1/health")).body).toMatchObject({
      status: "ok",
      accelerator: expect.any(String),
      jail: { enabled: true, cgroupVersion: expect.any(Number) }, // tests run as root
    });
    const doc = await api.call("GET", "/v1/openapi.json");
    expect(doc.status).toBe(200);
    expect(Object.keys(doc.body.paths)).toEqual(expect.arrayContaining(["/v1/microvms", "/v1/microvms/{id}/exec", "/v1/keys"]));
  });
});

describe("microVM lifecycle over HTTP", () => {
  it("creates RUNNING, runs commands, moves files, suspends, resumes, logs events, terminates", async () => {
    const vm = await createVm(alice, { env: { GREETING: "hello" }, metadata: { user: "u-1" } });
    expect(vm).toMatchObject({ state: "RUNNING", image: "base", vcpus: 1, memoryMiB: 512, metadata: { user: "u-1" } });
    const id = vm.microVmId;

    const exec = await api.call("POST", `/v1/microvms/${id}/exec`, { key: alice, body: { command: "echo $GREETING; exit 4" } });
    expect(exec.body).toMatchObject({ exitCode: 4, stdout: "hello\n", stderr: "" });

    const stream = await api.call("POST", `/v1/microvms/${id}/exec`, {
      key: alice,
      body: { command: ["sh", "-c", "echo out; echo err >&2"] },
      headers: { accept: "application/x-ndjson" },
    });
    const lines = stream.text.trim().split("\n").map((l) => JSON.parse(l));
    expect(lines).toEqual(expect.arrayContaining([{ stdout: "out\n" }, { stderr: "err\n" }]));
    expect(lines.at(-1)).toMatchObject({ exitCode: 0 });

    const data = randomBytes(3 * 1024 * 1024);
    const put = await api.call("PUT", `/v1/microvms/${id}/files?path=/root/dir/blob.bin`, { key: alice, raw: data, headers: { "content-type": "application/octet-stream" } });
    expect(put.status, put.text).toBe(200);
    const got = await fetch(`${api.url}/v1/microvms/${id}/files?path=/root/dir/blob.bin`, { headers: { authorization: `Bearer ${alice}` } });
    expect(got.headers.get("content-type")).toBe("application/octet-stream");
    expect(createHash("sha256").update(Buffer.from(await got.arrayBuffer())).digest("hex")).toBe(createHash("sha256").update(data).digest("hex"));
    const listing = await api.call("GET", `/v1/microvms/${id}/files?path=/root/dir`, { key: alice });
    expect(listing.body.entries.map((e: { name: string }) => e.name)).toEqual(["blob.bin"]);
    expect((await api.call("DELETE", `/v1/microvms/${id}/files?path=/root/dir`, { key: alice })).status).toBe(200);
    expect((await api.call("GET", `/v1/microvms/${id}/files?path=/root/dir`, { key: alice })).status).toBe(404);

    expect((await api.call("POST", `/v1/microvms/${id}/suspend`, { key: alice })).body.state).toBe("SUSPENDED");
    const again = await api.call("POST", `/v1/microvms/${id}/suspend`, { key: alice });
    expect(again.status).toBe(409);
    expect(again.body.error).toMatchObject({ code: "InvalidState", message: `cannot suspend microVM ${id}: it is SUSPENDED` });
    expect((await api.call("POST", `/v1/microvms/${id}/resume`, { key: alice })).body.state).toBe("RUNNING");

    const list = await api.call("GET", "/v1/microvms?state=RUNNING", { key: alice });
    expect(list.body.microVms.map((v: { microVmId: string }) => v.microVmId)).toContain(id);

    const del = await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
    expect(del.body.state).toBe("TERMINATED");
    expect((await api.call("GET", `/v1/microvms/${id}`, { key: alice })).body.state).toBe("TERMINATED");
    const events = (await api.call("GET", `/v1/microvms/${id}/events`, { key: alice })).body.events.map((e: { type: string }) => e.type);
    expect(events).toEqual(["created", "suspended", "resumed", "terminated"]);
  });

  it("auto-resumes a suspended VM on exec, and suspends it again when idle", async () => {
    const { microVmId: id } = await createVm(alice, { idlePolicy: { suspendAfterSeconds: 1 } });
    await waitFor(async () => (await api.call("GET", `/v1/microvms/${id}`, { key: alice })).body.state === "SUSPENDED");
    const exec = await api.call("POST", `/v1/microvms/${id}/exec`, { key: alice, body: { command: "echo back" } });
    expect(exec.body.stdout).toBe("back\n");
    const events = (await api.call("GET", `/v1/microvms/${id}/events`, { key: alice })).body.events;
    expect(events.map((e: { message: string }) => e.message)).toEqual(
      expect.arrayContaining(["suspended (idle for 1 s)", "resumed (exec in)"]),
    );
    await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });

  it("refuses exec on a suspended VM without autoResume", async () => {
    const { microVmId: id } = await createVm(alice, { idlePolicy: { autoResume: false, suspendAfterSeconds: 0 } });
    await api.call("POST", `/v1/microvms/${id}/suspend`, { key: alice });
    const exec = await api.call("POST", `/v1/microvms/${id}/exec`, { key: alice, body: { command: "true" } });
    expect(exec.status).toBe(409);
    await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });

  it("ends a VM at its max runtime with an event saying why", async () => {
    const { microVmId: id } = await createVm(alice, { maxRuntimeSeconds: 2 });
    await waitFor(async () => (await api.call("GET", `/v1/microvms/${id}`, { key: alice })).body.state === "TERMINATED");
    const events = (await api.call("GET", `/v1/microvms/${id}/events`, { key: alice })).body.events;
    expect(events.at(-1).message).toBe("terminated (max runtime of 2 s reached)");
  });

  it("marks a VM FAILED with the reason when its QEMU process dies, answers the exec it cut short with 502, and frees its capacity", async () => {
    const { microVmId: id } = await createVm();
    const used = (await api.microvms.usage()).usedVcpus;
    const cut = api.call("POST", `/v1/microvms/${id}/exec`, { key: alice, body: { command: "touch /tmp/started; sleep 60" } });
    await waitFor(async () => (await api.call("GET", `/v1/microvms/${id}/files?path=/tmp/started`, { key: alice })).status === 200);
    process.kill(api.engine.get(id).machine!.pid, "SIGKILL");
    // The connection to its agent broke: the guest's doing, not the server's (a 500).
    const res = await cut;
    expect(res.status, res.text).toBe(502);
    expect(res.body.error).toMatchObject({ code: "BadGateway", message: expect.stringContaining("the connection to the agent broke while the command ran") });
    await waitFor(async () => (await api.call("GET", `/v1/microvms/${id}`, { key: alice })).body.state === "FAILED");
    const vm = (await api.call("GET", `/v1/microvms/${id}`, { key: alice })).body;
    expect(vm.stateReason).toContain("QEMU process exited unexpectedly");
    expect((await api.microvms.usage()).usedVcpus).toBe(used - 1);
    expect((await api.call("DELETE", `/v1/microvms/${id}`, { key: alice })).body.state).toBe("TERMINATED");
  });

  it("names a command that does not exist", async () => {
    const { microVmId: id } = await createVm();
    const res = await api.call("POST", `/v1/microvms/${id}/exec`, { key: alice, body: { command: ["no-such-binary"] } });
    expect(res.status, res.text).toBe(400);
    expect(res.body.error.code).toBe("CommandNotFound");
    await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });
});

describe("tenants and keys", () => {
  it("hides one tenant's VMs from another on every route", async () => {
    const { microVmId: id } = await createVm(alice);
    const routes: [string, string, unknown?][] = [
      ["GET", `/v1/microvms/${id}`],
      ["POST", `/v1/microvms/${id}/suspend`],
      ["POST", `/v1/microvms/${id}/resume`],
      ["POST", `/v1/microvms/${id}/exec`, { command: "true" }],
      ["GET", `/v1/microvms/${id}/files?path=/etc/hostname`],
      ["PUT", `/v1/microvms/${id}/files?path=/tmp/x`],
      ["DELETE", `/v1/microvms/${id}/files?path=/tmp/x`],
      ["GET", `/v1/microvms/${id}/events`],
      ["GET", `/v1/microvms/${id}/metrics`],
      ["GET", `/v1/microvms/${id}/logs`],
      ["GET", `/v1/microvms/${id}/terminal`],
      ["DELETE", `/v1/microvms/${id}`],
    ];
    for (const [method, path, body] of routes) {
      const res = await api.call(method, path, { key: bob, body, raw: method === "PUT" ? "x" : undefined });
      expect(res.status, `${method} ${path}`).toBe(404);
      expect(res.body.error.code).toBe("NotFound");
    }
    expect((await api.call("GET", "/v1/microvms", { key: bob })).body.microVms).toEqual([]);
    expect((await api.call("GET", `/v1/microvms/${id}`, { key: alice })).body.state).toBe("RUNNING");
    await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });

  it("enforces permissions and revokes at once", async () => {
    const readOnly = await api.tenantKey("carol", ["microvm:read"]);
    const create = await api.call("POST", "/v1/microvms", { key: readOnly, body: { image: "base" } });
    expect(create.status).toBe(403);
    expect(create.body.error.message).toBe("this key lacks the microvm:create permission");
    expect((await api.call("POST", "/v1/tenants", { key: alice, body: { name: "x" } })).status).toBe(403);
    expect((await api.call("GET", "/v1/microvms", { key: readOnly })).status).toBe(200);

    const keys = (await api.call("GET", "/v1/keys", { key: api.adminKey })).body.keys;
    expect(JSON.stringify(keys)).not.toContain(readOnly);
    const carolKey = keys.find((k: { permissions: string[] }) => k.permissions.join() === "microvm:read");
    expect((await api.call("DELETE", `/v1/keys/${carolKey.keyId}`, { key: api.adminKey })).status).toBe(200);
    expect((await api.call("GET", "/v1/microvms", { key: readOnly })).status).toBe(401);
    expect((await api.call("GET", "/v1/microvms")).status).toBe(401);
    expect((await api.call("GET", "/v1/microvms", { key: "ck_bogus" })).status).toBe(401);
  });
});

describe("malformed input", () => {
  const cases: [string, string, { body?: unknown; raw?: string; headers?: Record<string, string> }, number, string][] = [
    ["POST", "/v1/microvms", { body: { image: "base", vcpus: 0 } }, 400, "body.vcpus must be >= 1"],
    ["POST", "/v1/microvms", { body: { image: "base", memoryMiB: 64 } }, 400, "body.memoryMiB must be >= 128"],
    ["POST", "/v1/microvms", { body: { image: "base", vcpus: "two" } }, 400, "body.vcpus must be integer"],
    ["POST", "/v1/microvms", { body: {} }, 400, "must have required property 'image'"],
    ["POST", "/v1/microvms", { body: { image: "base", bogus: 1 } }, 400, "must NOT have additional properties"],
    ["POST", "/v1/microvms", { body: { image: "nope" } }, 404, "image nope not found"],
    ["POST", "/v1/microvms", { raw: "{not json", headers: { "content-type": "application/json" } }, 400, ""],
    ["POST", "/v1/microvms", { raw: JSON.stringify({ image: "x".repeat(2 * 1024 * 1024) }), headers: { "content-type": "application/json" } }, 413, ""],
    ["GET", "/v1/microvms/vm-nope", {}, 404, "microVM vm-nope not found"],
    ["GET", "/v1/microvms?limit=0", {}, 400, "querystring.limit must be >= 1"],
    ["POST", "/v1/microvms/vm-nope/exec", { body: { command: [] } }, 400, "body.command"],
    ["GET", "/v1/microvms/vm-nope/files?path=relative", {}, 400, "querystring.path"],
    ["POST", "/v1/keys", { body: { tenant: "alice", permissions: ["root"] } }, 403, "admin:*"],
  ];
  it.each(cases)("%s %s (case %#)", async (method, path, opts, status, message) => {
    const res = await api.call(method, path, { key: alice, ...opts });
    expect(res.status, res.text).toBe(status);
    expect(res.body.error.code).toEqual(expect.any(String));
    expect(res.body.error.message).toContain(message);
  });
});

describe("admission control", () => {
  it("admits up to the host capacity and answers 503 beyond it, leaking nothing", async () => {
    const results = await Promise.all(Array.from({ length: 30 }, () => api.call("POST", "/v1/microvms", { key: bob, body: { image: "base" } })));
    const created = results.filter((r) => r.status === 201);
    const refused = results.filter((r) => r.status === 503);
    expect(created.length).toBe(10);
    expect(refused.length).toBe(20);
    expect(refused[0]!.body.error).toMatchObject({ code: "CapacityExceeded" });
    for (const r of created) await api.call("DELETE", `/v1/microvms/${r.body.microVmId}`, { key: bob });
    expect(api.engine.list().filter((v) => v.status === "running")).toEqual([]);
    expect((await api.call("GET", "/v1/microvms?state=RUNNING", { key: bob })).body.microVms).toEqual([]);
  });
});

async function waitFor(cond: () => Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 200));
  }
}
