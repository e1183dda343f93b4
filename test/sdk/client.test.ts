import { CocoonClient, CocoonError, ConflictError, ConnectionError, InvalidStateError, NotFoundError, TimeoutError, UnauthorizedError, ValidationError, type MicroVm } from "@cocoon/sdk";
import { describe, expect, it } from "vitest";
import { freeLoopbackPort } from "../../src/util/ports.ts";
import { useServerProcess } from "../support/server-process.ts";

// The SDK against a real `cocoon server` process with real VMs.
const server = await useServerProcess();
const client = new CocoonClient({ baseUrl: server.url, apiKey: server.adminKey });

describe("@cocoon/sdk against a real server", () => {
  it("reports health without a key", async () => {
    const health = await new CocoonClient({ baseUrl: server.url, apiKey: "" }).health();
    expect(health.status).toBe("ok");
    expect(["kvm", "tcg"]).toContain(health.accelerator);
  });

  it("creates a VM, runs commands, writes and reads files, suspends, resumes and terminates it", async () => {
    const vm: MicroVm = await client.microvms.create({ image: "base", idlePolicy: { suspendAfterSeconds: 0 }, metadata: { test: "sdk" } });
    try {
      expect(vm.state).toBe("RUNNING");
      expect(vm.info.memoryMiB).toBe(512);
      expect(vm.info.metadata).toEqual({ test: "sdk" });

      const result = await vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"]);
      expect(result).toMatchObject({ exitCode: 7, stdout: "out\n", stderr: "err\n" });
      expect((await vm.exec("echo $GREETING", { env: { GREETING: "hi" } })).stdout).toBe("hi\n");

      const events = [];
      for await (const ev of vm.execStream("echo one; echo two >&2; exit 3")) events.push(ev);
      expect(events.filter((e) => e.type === "stdout").map((e) => (e as { data: string }).data).join("")).toBe("one\n");
      expect(events.filter((e) => e.type === "stderr").map((e) => (e as { data: string }).data).join("")).toBe("two\n");
      expect(events.at(-1)).toMatchObject({ type: "exit", exitCode: 3 });

      const bytes = new Uint8Array([0, 1, 2, 250, 255]);
      expect(await vm.files.write("/tmp/sdk/deep/bin.dat", bytes)).toMatchObject({ path: "/tmp/sdk/deep/bin.dat", size: 5 });
      expect(await vm.files.read("/tmp/sdk/deep/bin.dat")).toEqual(bytes);
      await vm.files.write("/tmp/sdk/hello.txt", "héllo\n");
      expect(await vm.files.readText("/tmp/sdk/hello.txt")).toBe("héllo\n");
      const stream = await vm.files.readStream("/tmp/sdk/hello.txt");
      expect(await new Response(stream).text()).toBe("héllo\n");
      expect((await vm.files.list("/tmp/sdk")).map((e) => e.name).sort()).toEqual(["deep", "hello.txt"]);
      await expect(vm.files.read("/tmp/sdk")).rejects.toBeInstanceOf(ValidationError);
      await vm.files.remove("/tmp/sdk/hello.txt");
      await expect(vm.files.read("/tmp/sdk/hello.txt")).rejects.toBeInstanceOf(NotFoundError);

      await vm.exec("echo kept > /root/state");
      expect((await vm.suspend()).state).toBe("SUSPENDED");
      expect(vm.state).toBe("SUSPENDED");
      await expect(vm.suspend()).rejects.toBeInstanceOf(InvalidStateError);
      expect((await client.microvms.get(vm.id)).state).toBe("SUSPENDED");
      expect((await vm.resume()).state).toBe("RUNNING");
      expect((await vm.exec("cat /root/state")).stdout).toBe("kept\n");

      const [child] = await vm.fork({ count: 1 });
      expect(child!.info).toMatchObject({ state: "RUNNING", forkedFrom: vm.id });
      expect((await child!.exec("cat /root/state; hostname")).stdout).toBe(`kept\n${child!.id}\n`);
      expect(await child!.terminate()).toBe(true);
      expect(await vm.snapshot("sdk-snap")).toMatchObject({ name: "sdk-snap", version: 1, state: "READY", sourceMicroVmId: vm.id });
      await client.images.delete("sdk-snap");
      await expect(client.microvms.fork(vm.id, { count: 17 })).rejects.toBeInstanceOf(ValidationError);

      const listed = await client.microvms.list({ state: "RUNNING" });
      expect(listed.microVms.map((v) => v.id)).toContain(vm.id);
      const types = (await vm.events()).map((e) => e.message);
      expect(types.length).toBeGreaterThanOrEqual(3);
    } finally {
      expect(await vm.terminate()).toBe(true);
    }
    expect(vm.info.state).toBe("TERMINATED");
    expect((await vm.refresh()).state).toBe("TERMINATED");
  });

  it("creates, lists, describes and deletes volumes", async () => {
    const created = await client.volumes.create({ name: "sdk-vol", sizeGiB: 1 });
    expect(created).toMatchObject({ name: "sdk-vol", sizeGiB: 1, state: "AVAILABLE", attachedTo: [] });
    expect((await client.volumes.list()).map((v) => v.name)).toContain("sdk-vol");
    expect((await client.volumes.get(created.volumeId)).name).toBe("sdk-vol");
    await expect(client.volumes.create({ name: "sdk-vol", sizeGiB: 1 })).rejects.toBeInstanceOf(ConflictError);
    expect((await client.volumes.delete("sdk-vol")).volumeId).toBe(created.volumeId);
    await expect(client.volumes.get("sdk-vol")).rejects.toBeInstanceOf(NotFoundError);
  });

  it("maps API errors to typed CocoonErrors", async () => {
    const missing = await client.microvms.get("vm-does-not-exist").catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(NotFoundError);
    expect(missing).toBeInstanceOf(CocoonError);
    expect(missing).toMatchObject({ code: "NotFound", status: 404 });
    expect((missing as CocoonError).requestId).toMatch(/^[0-9a-f-]{36}$/);
    expect(await client.microvms.terminate("vm-does-not-exist")).toBe(false);

    const invalid = (await client.microvms.create({ image: "base", memoryMiB: 64 }).catch((e: unknown) => e)) as CocoonError;
    expect(invalid).toBeInstanceOf(ValidationError);
    expect(invalid.status).toBe(400);
    expect(invalid.field).toContain("memoryMiB");
    expect(invalid.message).toContain("memoryMiB");

    const unauth = await new CocoonClient({ baseUrl: server.url, apiKey: "nope" }).microvms.list().catch((e: unknown) => e);
    expect(unauth).toBeInstanceOf(UnauthorizedError);
  });

  it("fails with ConnectionError, TimeoutError, or the caller's abort reason", async () => {
    const closed = new CocoonClient({ baseUrl: `http://127.0.0.1:${await freeLoopbackPort()}` });
    await expect(closed.health()).rejects.toBeInstanceOf(ConnectionError);

    const vm = await client.microvms.create({ image: "base" });
    try {
      const slow = await vm.exec("sleep 5", {}, { timeoutMs: 300 }).catch((e: unknown) => e);
      expect(slow).toBeInstanceOf(TimeoutError);
      const abort = new AbortController();
      setTimeout(() => abort.abort(new Error("stop")), 300);
      await expect(vm.exec("sleep 5", {}, { signal: abort.signal })).rejects.toThrow("stop");
    } finally {
      await vm.terminate();
    }
  });
});
