import { describe, expect, it } from "vitest";
import { useApi } from "../support/api-fixture.ts";

/*
 * Persistent volumes (issue #17, docs/volumes.md): a tenant's ext4 disks
 * that outlive the VMs they are attached to, mounted by the guest (never on
 * the host). One volume, reused across cases: read-write in one VM across a
 * suspend and resume, then read-only in two VMs at once.
 */
const api = await useApi({ capacity: { vcpus: 8, memoryMiB: 8 * 512 } });
const alice = await api.tenantKey("alice", ["microvm:*", "volume:*", "image:*"]);
const bob = await api.tenantKey("bob", ["microvm:*", "volume:*"]);

const createVm = (volumes: unknown[], key = alice) => api.call("POST", "/v1/microvms", { key, body: { image: "base", idlePolicy: { suspendAfterSeconds: 0 }, volumes } });
const volume = (name: string, key = alice) => api.call("GET", `/v1/volumes/${name}`, { key });

async function sh(id: string, command: string): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  const res = await api.call("POST", `/v1/microvms/${id}/exec`, { key: alice, body: { command } });
  expect(res.status, res.text).toBe(200);
  return { exitCode: res.body.exitCode, stdout: (res.body.stdout as string).trim(), stderr: res.body.stderr };
}

describe("volumes", () => {
  it("are created, listed and described per tenant, and refuse bad names, sizes and quotas naming the field", async () => {
    const created = await api.call("POST", "/v1/volumes", { key: alice, body: { name: "data", sizeGiB: 2 } });
    expect(created.status, created.text).toBe(201);
    expect(created.body).toMatchObject({ name: "data", sizeGiB: 2, state: "AVAILABLE", attachedTo: [] });
    expect(created.body.volumeId).toMatch(/^vol-[0-9a-f]{12}$/);
    expect((await volume(created.body.volumeId)).body.name).toBe("data");
    expect((await api.call("GET", "/v1/volumes", { key: alice })).body.volumes.map((v: { name: string }) => v.name)).toEqual(["data"]);

    const refused = async (body: unknown, status: number, field: string) => {
      const res = await api.call("POST", "/v1/volumes", { key: alice, body });
      expect(res.status, res.text).toBe(status);
      expect(res.body.error.details.field).toBe(field);
    };
    await refused({ name: "data", sizeGiB: 1 }, 409, "name");
    await refused({ name: "../etc", sizeGiB: 1 }, 400, "name");
    await refused({ name: "Big Data", sizeGiB: 1 }, 400, "name");
    await refused({ name: "big", sizeGiB: 0 }, 400, "body.sizeGiB");
    await refused({ name: "big", sizeGiB: 33 }, 400, "body.sizeGiB");
    await refused({ name: "big", sizeGiB: 1.5 }, 400, "body.sizeGiB");
    const missing = await api.call("POST", "/v1/volumes", { key: alice, body: { name: "big" } });
    expect(missing.status).toBe(400);
    expect(missing.body.error.message).toContain("sizeGiB");

    // Quotas: the total size, then the count (an admin's overrides).
    await api.call("PATCH", "/v1/tenants/alice", { key: api.adminKey, body: { quotas: { volumeGiB: 3 } } });
    const tooBig = await api.call("POST", "/v1/volumes", { key: alice, body: { name: "big", sizeGiB: 2 } });
    expect(tooBig.status).toBe(429);
    expect(tooBig.body.error).toMatchObject({ code: "QuotaExceeded", details: { quota: "volumeGiB", limit: 3, held: 2 } });
    await api.call("PATCH", "/v1/tenants/alice", { key: api.adminKey, body: { quotas: { volumeGiB: 100, volumes: 1 } } });
    expect((await api.call("POST", "/v1/volumes", { key: alice, body: { name: "more", sizeGiB: 1 } })).body.error.details).toMatchObject({ quota: "volumes", limit: 1 });
    await api.call("PATCH", "/v1/tenants/alice", { key: api.adminKey, body: { quotas: { volumes: 20 } } });

    // Another tenant's volume does not exist for bob: not described, deleted nor attached.
    expect((await volume("data", bob)).status).toBe(404);
    expect((await api.call("DELETE", "/v1/volumes/data", { key: bob })).status).toBe(404);
    expect((await api.call("GET", "/v1/volumes", { key: bob })).body.volumes).toEqual([]);
    const stolen = await createVm([{ name: "data", path: "/data" }], bob);
    expect(stolen.status).toBe(404);
    expect(stolen.body.error.details.field).toBe("volumes[0].name");
    // Bob may have a volume of the same name: names are per tenant.
    expect((await api.call("POST", "/v1/volumes", { key: bob, body: { name: "data", sizeGiB: 1 } })).status).toBe(201);
  });

  it("refuses bad mount points and requests before launching anything", async () => {
    for (const [path, status] of [["/", 400], ["/proc", 400], ["/proc/self", 400], ["/etc/x", 400], ["data", 400], ["/data/../etc", 400], ["/data/", 400]] as const) {
      const res = await createVm([{ name: "data", path }]);
      expect(res.status, path).toBe(status);
      expect(res.body.error.details.field, path).toMatch(/volumes\[0\]\.path$/);
    }
    const twice = await createVm([{ name: "data", path: "/a" }, { name: "data", path: "/b" }]);
    expect(twice.body.error.details.field).toBe("volumes[1].name");
    expect((await createVm([{ name: "nope", path: "/a" }])).status).toBe(404);
    expect((await createVm([1, 2, 3, 4, 5].map((i) => ({ name: "data", path: `/v${i}` })))).status).toBe(400);
    expect((await api.call("GET", "/v1/microvms", { key: alice })).body.microVms).toEqual([]);
  });

  it("keep their data across suspend, resume and terminate; one writer, or many readers", async () => {
    const a = await createVm([{ name: "data", path: "/data" }]);
    expect(a.status, a.text).toBe(201);
    const aId = a.body.microVmId as string;
    // The guest sees the volume's size and mounts it where asked.
    const device = (await sh(aId, "awk '$2 == \"/data\" {print $1}' /proc/mounts")).stdout;
    expect((await sh(aId, `cat /sys/class/block/${device.replace("/dev/", "")}/size`)).stdout).toBe(String((2 * 2 ** 30) / 512));
    expect((await sh(aId, "echo written-by-a > /data/note && sync && cat /data/note")).stdout).toBe("written-by-a");
    expect((await volume("data")).body).toMatchObject({ state: "ATTACHED", attachedTo: [{ microVmId: aId, path: "/data", readOnly: false }] });

    // In use: no second writer, no reader beside a writer, no delete, no copy of the VM.
    const second = await createVm([{ name: "data", path: "/data" }]);
    expect(second.status).toBe(409);
    expect(second.body.error.details).toMatchObject({ volume: "data", attachedTo: [aId] });
    expect((await createVm([{ name: "data", path: "/data", readOnly: true }])).status).toBe(409);
    const deleting = await api.call("DELETE", "/v1/volumes/data", { key: alice });
    expect(deleting.status).toBe(409);
    expect(deleting.body.error.details.attachedTo).toEqual([aId]);
    const fork = await api.call("POST", `/v1/microvms/${aId}/fork`, { key: alice, body: { count: 1 } });
    expect(fork.status).toBe(409);
    expect(fork.body.error.message).toContain("data at /data");
    expect((await api.call("POST", `/v1/microvms/${aId}/snapshots`, { key: alice, body: { name: "snap" } })).status).toBe(409);

    expect((await api.call("POST", `/v1/microvms/${aId}/suspend`, { key: alice })).body.state).toBe("SUSPENDED");
    expect((await volume("data")).body.state).toBe("ATTACHED");
    expect((await api.call("POST", `/v1/microvms/${aId}/resume`, { key: alice })).body.state).toBe("RUNNING");
    expect((await sh(aId, "echo after-resume >> /data/note && sync && cat /data/note")).stdout).toBe("written-by-a\nafter-resume");
    expect((await api.call("DELETE", `/v1/microvms/${aId}`, { key: alice })).body.state).toBe("TERMINATED");
    expect((await volume("data")).body).toMatchObject({ state: "AVAILABLE", attachedTo: [] });

    // Two readers at once see what A wrote and cannot write; a writer waits for them.
    const readers = await Promise.all([0, 1].map(() => createVm([{ name: "data", path: "/mnt/data", readOnly: true }])));
    const ids = readers.map((r) => {
      expect(r.status, r.text).toBe(201);
      return r.body.microVmId as string;
    });
    for (const id of ids) {
      expect((await sh(id, "cat /mnt/data/note")).stdout).toBe("written-by-a\nafter-resume");
      const write = await sh(id, "touch /mnt/data/x");
      expect(write.exitCode).not.toBe(0);
      expect(write.stderr).toContain("Read-only file system");
    }
    expect((await volume("data")).body.attachedTo.map((t: { microVmId: string }) => t.microVmId).sort()).toEqual([...ids].sort());
    expect((await createVm([{ name: "data", path: "/data" }])).status).toBe(409);
    for (const id of ids) await api.call("DELETE", `/v1/microvms/${id}`, { key: alice });

    // Free again: deleted, and gone.
    const deleted = await api.call("DELETE", "/v1/volumes/data", { key: alice });
    expect(deleted.status, deleted.text).toBe(200);
    expect((await volume("data")).status).toBe(404);
  });
});
