import { describe, expect, it } from "vitest";
import { useApi } from "../support/api-fixture.ts";
import { makeZip } from "../support/zip.ts";

/*
 * Budgets outside admission (issue #12): what a tenant keeps on the host
 * beyond its running VMs (image versions, suspended VMs, snapshots of new
 * shapes of managed images) is bounded by quotas an admin sets per tenant
 * over the operator's defaults; a refusal is a 429 naming the quota.
 */
const api = await useApi();
const alice = await api.tenantKey("alice", ["microvm:*", "image:*"]);
const setQuotas = (quotas: Record<string, number>) => api.call("PATCH", "/v1/tenants/alice", { key: api.adminKey, body: { quotas } });
const create = (body: Record<string, unknown>, key = alice) => api.call("POST", "/v1/microvms", { key, body: { image: "base", idlePolicy: { suspendAfterSeconds: 0 }, ...body } });

describe("tenant quotas", () => {
  it("are the operator's defaults until an admin sets them, one by one, and are shown on the tenant", async () => {
    const before = await api.call("GET", "/v1/tenants/alice", { key: api.adminKey });
    const volumes = { volumes: 20, volumeGiB: 100 };
    expect(before.body.quotas).toEqual({ images: 100, suspendedMicroVms: 200, baseShapes: 4, ...volumes });
    expect((await setQuotas({ images: 0 })).body.quotas).toEqual({ images: 0, suspendedMicroVms: 200, baseShapes: 4, ...volumes });
    expect((await setQuotas({ baseShapes: 0 })).body.quotas).toEqual({ images: 0, suspendedMicroVms: 200, baseShapes: 0, ...volumes });
    const bad = await setQuotas({ images: -1 });
    expect(bad.status).toBe(400);
    expect(bad.body.error.details.field).toBe("body.quotas.images");
    // Only an admin sets them.
    expect((await api.call("PATCH", "/v1/tenants/alice", { key: alice, body: { quotas: { images: 9 } } })).status).toBe(403);
  });

  it("refuses an image version past the images quota, before anything is built", async () => {
    await setQuotas({ images: 0 });
    const form = new FormData();
    form.set("name", "app");
    form.set("dockerfile", "FROM base\nRUN true\n");
    form.set("code", new Blob([new Uint8Array(makeZip([{ name: "x", data: "x" }]))]), "code.zip");
    const res = await fetch(`${api.url}/v1/images`, { method: "POST", headers: { authorization: `Bearer ${alice}` }, body: form });
    const body = (await res.json()) as { error: { code: string; message: string; details: Record<string, unknown> } };
    expect(res.status).toBe(429);
    expect(body.error).toMatchObject({ code: "QuotaExceeded", details: { quota: "images", limit: 0, held: 0 } });
    expect((await api.call("GET", "/v1/images?name=app", { key: alice })).body.images).toEqual([]);
  });

  it("refuses a suspend past the suspendedMicroVms quota (the VM runs on), and says so once for an idle suspend", async () => {
    await setQuotas({ suspendedMicroVms: 1 });
    const [a, b] = await Promise.all([create({}), create({ idlePolicy: { suspendAfterSeconds: 1 } })]);
    expect([a.status, b.status]).toEqual([201, 201]);
    expect((await api.call("POST", `/v1/microvms/${a.body.microVmId}/suspend`, { key: alice })).body.state).toBe("SUSPENDED");
    // b goes idle and its suspend is refused: it stays RUNNING, with one event saying why.
    await new Promise((r) => setTimeout(r, 3000));
    expect((await api.call("GET", `/v1/microvms/${b.body.microVmId}`, { key: alice })).body.state).toBe("RUNNING");
    const events = (await api.call("GET", `/v1/microvms/${b.body.microVmId}/events`, { key: alice })).body.events as { type: string; message: string }[];
    expect(events.filter((e) => e.type === "suspend-refused")).toHaveLength(1);
    expect(events.find((e) => e.type === "suspend-refused")!.message).toContain("suspendedMicroVms");
    const refused = await api.call("POST", `/v1/microvms/${b.body.microVmId}/suspend`, { key: alice });
    expect(refused.status).toBe(429);
    expect(refused.body.error.details).toMatchObject({ quota: "suspendedMicroVms", limit: 1, held: 1 });
    // Freeing one makes room: b, idle, is suspended by its policy at its next check (an explicit suspend
    // here would race that check and find b SUSPENDING or SUSPENDED already).
    await api.call("DELETE", `/v1/microvms/${a.body.microVmId}`, { key: alice });
    const stateOfB = async () => (await api.call("GET", `/v1/microvms/${b.body.microVmId}`, { key: alice })).body.state as string;
    for (const deadline = Date.now() + 30_000; (await stateOfB()) !== "SUSPENDED" && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 250));
    expect(await stateOfB()).toBe("SUSPENDED");
    await api.call("DELETE", `/v1/microvms/${b.body.microVmId}`, { key: alice });
  });

  it("charges a new shape of a managed image to the first tenant that asks for it; a known shape and the default are free", async () => {
    await setQuotas({ baseShapes: 0 });
    const refused = await create({ memoryMiB: 384 });
    expect(refused.status).toBe(429);
    expect(refused.body.error.details).toMatchObject({ quota: "baseShapes", limit: 0 });
    // The default shape needs no new snapshot.
    const plain = await create({});
    expect(plain.status).toBe(201);
    // Another tenant with room introduces the shape (a cold boot, once); then it is known, and free for alice too.
    const byAdmin = await create({ memoryMiB: 384 }, api.adminKey);
    expect(byAdmin.status, JSON.stringify(byAdmin.body)).toBe(201);
    const reuse = await create({ memoryMiB: 384 });
    expect(reuse.status, JSON.stringify(reuse.body)).toBe(201);
    for (const [vm, key] of [[plain, alice], [byAdmin, api.adminKey], [reuse, alice]] as const) await api.call("DELETE", `/v1/microvms/${vm.body.microVmId}`, { key });
  });
});
