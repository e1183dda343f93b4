import { describe, expect, it } from "vitest";
import { useApi } from "../support/api-fixture.ts";

// Named snapshots and forks of a running VM (issue #17): one parent, few children, reused across cases.
const api = await useApi({ capacity: { vcpus: 8, memoryMiB: 8 * 512 } });
const alice = await api.tenantKey("alice", ["microvm:*", "image:*"]);
const bob = await api.tenantKey("bob", ["microvm:*", "image:*"]);

async function sh(id: string, command: string): Promise<string> {
  const res = await api.call("POST", `/v1/microvms/${id}/exec`, { key: alice, body: { command } });
  expect(res.status, res.text).toBe(200);
  expect(res.body.exitCode, res.body.stderr).toBe(0);
  return (res.body.stdout as string).trim();
}

async function counter(id: string): Promise<number> {
  return Number(await sh(id, "cat /dev/shm/counter"));
}

/** A counter that lives in a shell's memory (written out to tmpfs each tick) and a file on disk. */
const COUNTER = "sh -c 'echo $$ > /dev/shm/counter.pid; i=0; while true; do i=$((i+1)); echo $i > /dev/shm/counter; sleep 0.1; done' > /dev/null 2>&1 &";

const created = await api.call("POST", "/v1/microvms", { key: alice, body: { image: "base" } });
expect(created.status, created.text).toBe(201);
const parent = created.body.microVmId as string;
await sh(parent, `${COUNTER} echo before > /root/disk.txt; echo before > /dev/shm/mem; sync`);

async function fork(id: string, count: number) {
  const res = await api.call("POST", `/v1/microvms/${id}/fork`, { key: alice, body: { count } });
  expect(res.status, res.text).toBe(201);
  return res.body.microVms as { microVmId: string; state: string; forkedFrom: string; endpoint: { token: string } }[];
}

describe("fork", () => {
  it("gives each child the parent's memory, processes and disk, an identity of its own, and diverges them", async () => {
    const parentView = (await api.call("GET", `/v1/microvms/${parent}`, { key: alice })).body;
    const children = await fork(parent, 2);
    expect(children).toHaveLength(2);
    for (const c of children) expect(c).toMatchObject({ state: "RUNNING", forkedFrom: parent });
    const [a, b] = children.map((c) => c.microVmId) as [string, string];
    expect(new Set([parentView.endpoint.token, ...children.map((c) => c.endpoint.token)]).size).toBe(3);

    const parentId = await sh(parent, "hostname; cat /etc/machine-id");
    for (const id of [a, b]) {
      expect(await sh(id, "cat /root/disk.txt /dev/shm/mem")).toBe("before\nbefore");
      const [hostname, machineId] = (await sh(id, "hostname; cat /etc/machine-id")).split("\n");
      expect(hostname).toBe(id);
      expect(machineId).not.toBe(parentId.split("\n")[1]);
      // The counter process came along and runs on.
      const first = await counter(id);
      await sh(id, "sleep 0.5");
      expect(await counter(id)).toBeGreaterThan(first);
    }
    // Entropy: the children's random streams differ.
    expect(await sh(a, "head -c 16 /dev/urandom | od -An -tx1")).not.toBe(await sh(b, "head -c 16 /dev/urandom | od -An -tx1"));

    // Memory and disk diverge: each writes its own, and A stops its counter.
    await sh(parent, "echo parent > /root/disk.txt; echo parent > /dev/shm/mem");
    await sh(a, "echo a > /root/disk.txt; echo a > /dev/shm/mem; kill $(cat /dev/shm/counter.pid)");
    await sh(b, "echo b > /root/disk.txt; echo b > /dev/shm/mem");
    expect(await sh(parent, "cat /root/disk.txt /dev/shm/mem")).toBe("parent\nparent");
    expect(await sh(a, "cat /root/disk.txt /dev/shm/mem")).toBe("a\na");
    expect(await sh(b, "cat /root/disk.txt /dev/shm/mem")).toBe("b\nb");
    const stopped = await counter(a);
    const running = await counter(parent);
    await sh(parent, "sleep 0.5");
    expect(await counter(a)).toBe(stopped);
    expect(await counter(parent)).toBeGreaterThan(running);

    // A child of a child, and a child across suspend and resume.
    const [grandchild] = await fork(a, 1);
    expect(await sh(grandchild!.microVmId, "cat /root/disk.txt /dev/shm/mem; hostname")).toBe(`a\na\n${grandchild!.microVmId}`);
    expect((await api.call("POST", `/v1/microvms/${a}/suspend`, { key: alice })).body.state).toBe("SUSPENDED");
    expect((await api.call("POST", `/v1/microvms/${a}/resume`, { key: alice })).body.state).toBe("RUNNING");
    expect(await sh(a, "cat /root/disk.txt /dev/shm/mem")).toBe("a\na");
    // The grandchild's disk outlives the child it was forked from.
    expect((await api.call("DELETE", `/v1/microvms/${a}`, { key: alice })).body.state).toBe("TERMINATED");
    expect(await sh(grandchild!.microVmId, "echo g >> /root/disk.txt; sync; cat /root/disk.txt")).toBe("a\ng");

    const events = (await api.call("GET", `/v1/microvms/${parent}/events`, { key: alice })).body.events as { type: string; message: string }[];
    expect(events.find((e) => e.type === "forked")?.message).toMatch(new RegExp(`^forked into ${a}, ${b} \\(2 of 2 running\\); paused \\d+ ms$`));
    for (const id of [b, grandchild!.microVmId]) await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });
  });

  it("refuses bad counts, another tenant's VM, a VM that is not running, and more than the host admits", async () => {
    for (const count of [0, 17, 1.5, "2"]) {
      const res = await api.call("POST", `/v1/microvms/${parent}/fork`, { key: alice, body: { count } });
      expect(res.status, res.text).toBe(400);
      expect(res.body.error.code).toBe("ValidationError");
      expect(res.text).toContain("count");
    }
    expect((await api.call("POST", `/v1/microvms/${parent}/fork`, { key: bob, body: { count: 1 } })).status).toBe(404);
    expect((await api.call("POST", `/v1/microvms/vm-0000000000000000/fork`, { key: alice, body: { count: 1 } })).status).toBe(404);
    const full = await api.call("POST", `/v1/microvms/${parent}/fork`, { key: alice, body: { count: 16 } });
    expect(full.status).toBe(503);
    expect(full.body.error.code).toBe("CapacityExceeded");
  });
});

describe("named snapshots", () => {
  it("makes a versioned image of the running VM that launches with its memory and disk, and is deleted like one", async () => {
    await sh(parent, "echo snapped > /root/disk.txt; echo snapped > /dev/shm/mem; sync");
    const res = await api.call("POST", `/v1/microvms/${parent}/snapshots`, { key: alice, body: { name: "snap" } });
    expect(res.status, res.text).toBe(201);
    expect(res.body).toMatchObject({ name: "snap", version: 1, state: "READY", sourceMicroVmId: parent, vcpus: 1, memoryMiB: 512 });
    // The VM ran on, and its later writes are not in the snapshot.
    await sh(parent, "echo later > /root/disk.txt; echo later > /dev/shm/mem");
    const v2 = await api.call("POST", `/v1/microvms/${parent}/snapshots`, { key: alice, body: { name: "snap" } });
    expect(v2.body).toMatchObject({ name: "snap", version: 2, state: "READY" });
    const listed = (await api.call("GET", "/v1/images", { key: alice })).body.images.filter((i: { name: string }) => i.name === "snap");
    expect(listed.map((i: { version: number }) => i.version)).toEqual([1, 2]);
    expect((await api.call("GET", "/v1/images", { key: bob })).body.images.some((i: { name: string }) => i.name === "snap")).toBe(false);

    const launched = await api.call("POST", "/v1/microvms", { key: alice, body: { image: "snap", imageVersion: 1 } });
    expect(launched.status, launched.text).toBe(201);
    const vm = launched.body.microVmId as string;
    expect(await sh(vm, "cat /root/disk.txt /dev/shm/mem; hostname")).toBe(`snapped\nsnapped\n${vm}`);
    const first = await counter(vm);
    await sh(vm, "sleep 0.5");
    expect(await counter(vm)).toBeGreaterThan(first);
    expect(await sh(parent, "cat /root/disk.txt")).toBe("later");

    const inUse = await api.call("DELETE", `/v1/images/${res.body.imageId}`, { key: alice });
    expect(inUse.status).toBe(409);
    await api.call("DELETE", `/v1/microvms/${vm}`, { key: alice });
    expect((await api.call("DELETE", "/v1/images/snap", { key: alice })).status).toBe(200);
    expect((await api.call("GET", "/v1/images/snap", { key: alice })).status).toBe(404);
    const events = (await api.call("GET", `/v1/microvms/${parent}/events`, { key: alice })).body.events as { type: string; message: string }[];
    expect(events.filter((e) => e.type === "snapshot").map((e) => e.message)[0]).toMatch(/^snapshot snap version 1 \(img-[0-9a-f]+\) taken; paused \d+ ms$/);
  });

  it("refuses a bad name, another tenant's VM and a VM that is not running", async () => {
    for (const name of ["../etc", "Snap", "", "base", "x".repeat(64)]) {
      const res = await api.call("POST", `/v1/microvms/${parent}/snapshots`, { key: alice, body: { name } });
      expect(res.status, `${name}: ${res.text}`).toBe(400);
      expect(res.text).toContain("name");
    }
    expect((await api.call("POST", `/v1/microvms/${parent}/snapshots`, { key: bob, body: { name: "mine" } })).status).toBe(404);
    const reader = await api.tenantKey("carol", ["microvm:*", "image:read"]);
    const vm = await api.call("POST", "/v1/microvms", { key: reader, body: { image: "base" } });
    expect((await api.call("POST", `/v1/microvms/${vm.body.microVmId}/snapshots`, { key: reader, body: { name: "mine" } })).status).toBe(403);
    await api.call("DELETE", `/v1/microvms/${vm.body.microVmId}`, { key: reader });
    // A suspend after live captures (a save that stops only for its last pass) is a plain one again.
    expect((await api.call("POST", `/v1/microvms/${parent}/suspend`, { key: alice })).body.state).toBe("SUSPENDED");
    const suspended = await api.call("POST", `/v1/microvms/${parent}/snapshots`, { key: alice, body: { name: "late" } });
    expect(suspended.status).toBe(409);
    expect(suspended.body.error.code).toBe("InvalidState");
    expect((await api.call("POST", `/v1/microvms/${parent}/fork`, { key: alice, body: { count: 1 } })).status).toBe(409);
  });
});
