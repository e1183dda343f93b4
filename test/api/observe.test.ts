import { describe, expect, it } from "vitest";
import WebSocket from "ws";
import { useApi } from "../support/api-fixture.ts";

const api = await useApi();
const key = await api.tenantKey("dora");

async function createVm(body: Record<string, unknown> = {}): Promise<string> {
  const res = await api.call("POST", "/v1/microvms", { key, body: { image: "base", ...body } });
  expect(res.status, res.text).toBe(201);
  return res.body.microVmId;
}

/** Opens the terminal WebSocket, types `input`, and collects output until the exit message. */
function runInTerminal(id: string, input: string, auth: "header" | "query" = "header"): Promise<{ output: string; exitCode: number }> {
  const url = `${api.url.replace("http", "ws")}/v1/microvms/${id}/terminal${auth === "query" ? `?access_token=${key}` : ""}`;
  const ws = new WebSocket(url, auth === "header" ? { headers: { authorization: `Bearer ${key}` } } : {});
  let output = "";
  return new Promise((resolve, reject) => {
    ws.on("open", () => {
      ws.send(JSON.stringify({ type: "resize", cols: 100, rows: 30 }));
      ws.send(Buffer.from(input), { binary: true });
    });
    ws.on("message", (data: Buffer, isBinary: boolean) => {
      if (isBinary) output += data.toString();
      else {
        const msg = JSON.parse(data.toString()) as { type: string; exitCode?: number; message?: string };
        if (msg.type === "exit") resolve({ output, exitCode: msg.exitCode! });
        if (msg.type === "error") reject(new Error(msg.message));
      }
    });
    ws.on("error", reject);
  });
}

describe("terminal", () => {
  it("runs a shell over a WebSocket, sized by resize messages", async () => {
    const id = await createVm();
    const { output, exitCode } = await runInTerminal(id, "stty size; echo hello-$((6*7)); exit 5\n");
    expect(output).toContain("30 100");
    expect(output).toContain("hello-42");
    expect(exitCode).toBe(5);
  });

  it("resumes a suspended VM, and takes the key as ?access_token= for browsers", async () => {
    const id = await createVm();
    await api.call("POST", `/v1/microvms/${id}/suspend`, { key });
    const { output } = await runInTerminal(id, "echo woke; exit\n", "query");
    expect(output).toContain("woke");
    expect((await api.call("GET", `/v1/microvms/${id}`, { key })).body.state).toBe("RUNNING");
  });

  it("refuses the upgrade without a key", async () => {
    const id = await createVm();
    const ws = new WebSocket(`${api.url.replace("http", "ws")}/v1/microvms/${id}/terminal`);
    const status = await new Promise<number>((resolve) => ws.on("unexpected-response", (_req, res) => resolve(res.statusCode ?? 0)));
    expect(status).toBe(401);
  });
});

describe("logs and metrics", () => {
  it("returns the console and the VM's resource samples", async () => {
    const id = await createVm();
    // A clone's console shows what the guest prints after its launch (its boot was in the image's).
    await api.call("POST", `/v1/microvms/${id}/exec`, { key, body: { command: "echo hello-console > /dev/ttyS0" } });
    const logs = await fetch(`${api.url}/v1/microvms/${id}/logs`, { headers: { authorization: `Bearer ${key}` } });
    expect(logs.headers.get("content-type")).toContain("text/plain");
    expect(await logs.text()).toContain("hello-console");

    await api.call("GET", `/v1/microvms/${id}/metrics`, { key });
    const m = await api.call("GET", `/v1/microvms/${id}/metrics`, { key });
    expect(m.body).toMatchObject({ cpuPercent: expect.any(Number), memoryUsedMiB: expect.any(Number), diskUsedMiB: expect.any(Number) });
    expect(m.body.memoryUsedMiB).toBeGreaterThan(0);
    expect(m.body.samples.length).toBe(2);
  });

  it("follows the console as the guest writes to it", async () => {
    const id = await createVm();
    const abort = new AbortController();
    // Headers come with the first bytes: the request is made, then the guest writes, then the answer is read.
    const response = fetch(`${api.url}/v1/microvms/${id}/logs?follow=true`, { headers: { authorization: `Bearer ${key}` }, signal: abort.signal });
    await new Promise((r) => setTimeout(r, 300));
    await api.call("POST", `/v1/microvms/${id}/exec`, { key, body: { command: "echo live-line-1 > /dev/ttyS0; sleep 1; echo live-line-2 > /dev/ttyS0" } });
    const reader = (await response).body!.getReader();
    let text = "";
    while (!text.includes("live-line-2")) {
      const { value, done } = await reader.read();
      if (done) break;
      text += Buffer.from(value).toString();
    }
    abort.abort();
    expect(text).toContain("live-line-1");
    expect(text).toContain("live-line-2");
  });

  it("serves Prometheus metrics to the admin only", async () => {
    await createVm();
    expect((await api.call("GET", "/metrics", { key })).status).toBe(403);
    const text = (await api.call("GET", "/metrics", { key: api.adminKey })).text;
    expect(text).toMatch(/cocoon_microvms\{state="RUNNING"\} \d+/);
    expect(text).toContain("cocoon_microvm_launch_seconds_bucket");
    expect(text).toMatch(/cocoon_host_capacity\{resource="vcpus",kind="capacity"\} \d+/);
  });
});

describe("egress policy through the API", () => {
  it("creates a VM with an allow list and names a bad entry", async () => {
    const bad = await api.call("POST", "/v1/microvms", { key, body: { image: "base", network: { egress: { allow: ["not a host!"] } } } });
    expect(bad.status).toBe(400);
    expect(bad.body.error).toMatchObject({ code: "ValidationError", details: { field: "network.egress.allow[0]" } });
    expect(bad.body.error.message).toContain('"not a host!"');
    const id = await createVm({ network: { egress: { allow: ["*.debian.org"] } } });
    expect((await api.call("GET", `/v1/microvms/${id}`, { key })).body.network).toEqual({ egress: { allow: ["*.debian.org"] } });
    expect((await api.call("DELETE", `/v1/microvms/${id}`, { key })).body.state).toBe("TERMINATED");
  });
});
