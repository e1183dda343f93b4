import { CreateMultipartUploadCommand, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { BucketSweep } from "../../src/store/bucket-sweep.ts";
import { SuspendedObjects } from "../../src/lifecycle/suspended-objects.ts";
import { BLOB_REFRESH_MS, ObjectStore, objectStoreConfigFromEnv, PART_BYTES, type ObjectStoreConfig } from "../../src/store/objects.ts";
import { SnapshotIncompatibleError } from "../../src/errors.ts";
import { ClusterSnapshots } from "../../src/images/cluster-snapshots.ts";
import { ImageObjects } from "../../src/images/image-objects.ts";
import { closeDatabase, openDatabase } from "../../src/store/db.ts";
import type { MicroVmRow } from "../../src/store/schema.ts";
import { qemuBuild, SNAPSHOT_FORMAT, type SnapshotManifest } from "../../src/vmm/snapshot.ts";
import { startSwift, type TestSwift } from "../support/swift.ts";

/*
 * The object store module against a real OpenStack Swift with its S3 layer
 * (test/support/swift.ts), through the real AWS SDK client.
 */
let swift: TestSwift;
let store: ObjectStore;
let config: ObjectStoreConfig;
let dir: string;
/** The same bucket through a raw client: what a hostile or broken store could hold. */
let raw: S3Client;

beforeAll(async () => {
  swift = await startSwift();
  dir = await mkdtemp("/tmp/cocoon-objects-");
  config = { url: swift.url, bucket: "cocoon-test", region: "us-east-1", accessKeyId: swift.accessKeyId, secretAccessKey: swift.secretAccessKey };
  store = new ObjectStore(config);
  await store.ensureBucket();
  await store.ensureBucket(); // idempotent
  raw = new S3Client({
    endpoint: swift.url,
    region: "us-east-1",
    forcePathStyle: true,
    credentials: { accessKeyId: swift.accessKeyId, secretAccessKey: swift.secretAccessKey },
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
  });
}, 60_000);

afterAll(async () => {
  store?.destroy();
  raw?.destroy();
  await swift?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");
const rawPut = (key: string, body: Buffer | string) => raw.send(new PutObjectCommand({ Bucket: config.bucket, Key: key, Body: body }));

describe("object store on Swift (s3api)", () => {
  it("puts and gets a small file and a multipart one, with the sha256 of what was read", async () => {
    const small = randomBytes(100_000);
    // Past one part: two parts, the second short.
    const big = Buffer.concat([randomBytes(PART_BYTES), randomBytes(1_000_000)]);
    await writeFile(join(dir, "small"), small);
    await writeFile(join(dir, "big"), big);
    expect(await store.putFile("t/small", join(dir, "small"))).toEqual({ sha256: sha256(small), bytes: small.length });
    expect(await store.putFile("t/big", join(dir, "big"))).toEqual({ sha256: sha256(big), bytes: big.length });
    expect(await store.head("t/big")).toMatchObject({ bytes: big.length });
    expect(await store.head("t/none")).toBeUndefined();
    await store.getFile("t/big", join(dir, "big.back"), { sha256: sha256(big), bytes: big.length });
    expect(sha256(await readFile(join(dir, "big.back")))).toBe(sha256(big));
    await store.delete("t/big");
    expect(await store.head("t/big")).toBeUndefined();
  });

  it("refuses a download whose checksum or size is not the expected one, and leaves no file", async () => {
    const body = randomBytes(1000);
    await rawPut("t/tampered", body);
    const target = join(dir, "tampered");
    const wrongHash = store.getFile("t/tampered", target, { sha256: sha256(randomBytes(10)), bytes: 1000 });
    await expect(wrongHash).rejects.toMatchObject({ code: "BadGateway", message: expect.stringContaining("sha256") });
    // A store that sends more than the manifest said is cut off at the limit.
    await expect(store.getFile("t/tampered", target, { sha256: sha256(body), bytes: 999 })).rejects.toMatchObject({ message: expect.stringContaining("larger than the 999 bytes") });
    await expect(store.getFile("t/tampered", target, { sha256: sha256(body), bytes: 1001 })).rejects.toMatchObject({ message: expect.stringContaining("has 1000 bytes") });
    expect((await readdir(dir)).filter((f) => f.startsWith("tampered") || f.endsWith(".partial"))).toEqual([]);
  });

  it("publishes a bundle with its manifest last; without a manifest it is not published", async () => {
    await writeFile(join(dir, "a"), "state bytes");
    await writeFile(join(dir, "b"), "disk bytes");
    await rawPut("bundles/half/state", "uploaded before a crash");
    expect(await store.fetchBundle("bundles/half", dir, { state: 100 })).toBeUndefined();
    const published = await store.publish("bundles/one", { state: join(dir, "a"), disk: join(dir, "b") }, { vm: "vm-1" });
    const into = await mkdtemp(join(dir, "into-"));
    const fetched = await store.fetchBundle("bundles/one", into, { state: 100, disk: 100 });
    expect(fetched).toEqual({ format: 1, files: published.files, meta: { vm: "vm-1" } });
    expect(await readFile(join(into, "state"), "utf8")).toBe("state bytes");
    expect(await readFile(join(into, "disk"), "utf8")).toBe("disk bytes");
    await store.deletePrefix("bundles/one");
    expect(await store.head("bundles/one/state")).toBeUndefined();
    expect(await store.fetchBundle("bundles/one", into, { state: 100 })).toBeUndefined();
  });

  it("treats a manifest as hostile: bounded, checked, sizes capped, paths never taken from it", async () => {
    const into = await mkdtemp(join(dir, "hostile-"));
    const attempt = (manifest: string | Buffer, limits: Record<string, number> = { state: 100 }) =>
      rawPut("bundles/bad/manifest.json", manifest).then(() => store.fetchBundle("bundles/bad", into, limits));
    await expect(attempt("{not json")).rejects.toMatchObject({ code: "BadGateway", message: expect.stringContaining("not JSON") });
    await expect(attempt(Buffer.alloc(70_000, 32))).rejects.toMatchObject({ message: expect.stringContaining("larger than 65536 bytes") });
    await expect(attempt(JSON.stringify({ format: 2, files: {} }))).rejects.toMatchObject({ message: expect.stringContaining("not a format 1") });
    await expect(attempt(JSON.stringify({ format: 1, files: { state: { sha256: "x", bytes: 1 } } }))).rejects.toMatchObject({ message: expect.stringContaining("no valid size and sha256 for state") });
    const hash = "0".repeat(64);
    await expect(attempt(JSON.stringify({ format: 1, files: { state: { sha256: hash, bytes: 101 } } }))).rejects.toMatchObject({ message: expect.stringContaining("more than its limit of 100") });
    await expect(attempt(JSON.stringify({ format: 1, files: { state: { sha256: hash, bytes: -1 } } }))).rejects.toMatchObject({ message: expect.stringContaining("no valid size") });
    // A manifest naming other files ("../../etc/x") is read only for the names the caller asks for.
    await rawPut("bundles/bad/state", "abc");
    const abc = sha256(Buffer.from("abc"));
    const fetched = await attempt(JSON.stringify({ format: 1, files: { state: { sha256: abc, bytes: 3 }, "../../escape": { sha256: abc, bytes: 3 } }, meta: {} }));
    expect(Object.keys(fetched!.files)).toEqual(["state"]);
    expect((await readdir(into)).sort()).toEqual(["state"]);
  });

  it("a published suspend comes back only as the VM's row allows: another VM's, oversized, or with fields out of range is refused", async () => {
    const objects = new SuspendedObjects(store, { blobsDir: join(dir, "blobs"), accelerator: "tcg" });
    const layer = join(dir, "layer");
    await writeFile(layer, randomBytes(5000));
    await writeFile(join(dir, "state"), randomBytes(3000));
    await writeFile(join(dir, "disk"), randomBytes(2000));
    const files = { state: join(dir, "state"), disk: join(dir, "disk"), backing: [layer], guestPorts: [8080], diskBytes: 2 ** 30, token: "t".repeat(32) };
    const row = { id: "vm-1", memory_mib: 128, disk_gib: 1, suspended_node: "b" } as MicroVmRow;
    const { prefix, manifestSha256 } = await objects.publish("vm-1", files);
    const into = await mkdtemp(join(dir, "suspend-"));
    const published = { ...row, suspended_object: prefix, suspended_manifest: manifestSha256 };
    const { meta, layers } = await objects.fetch(published, into);
    expect(meta).toMatchObject({ vm: "vm-1", qemuBuild: qemuBuild(), diskBytes: 2 ** 30, guestPorts: [8080] });
    expect(await readFile(layers[0]!)).toEqual(await readFile(layer));
    // The same layer again comes from the node's cache; it went up once.
    expect((await objects.fetch(published, await mkdtemp(join(dir, "again-")))).layers).toEqual(layers);
    await expect(objects.fetch({ ...published, id: "vm-2" }, into)).rejects.toMatchObject({ code: "BadGateway", message: expect.stringContaining("another microVM") });
    // Whoever can write the bucket cannot swap in a bundle of their own: the row pins the manifest by its sha256.
    const other = await store.publish(`microvms/vm-1/other`, { state: files.disk, disk: files.state }, { vm: "vm-1" });
    await rawPut(`${prefix}/manifest.json`, JSON.stringify({ format: other.format, files: other.files, meta: other.meta }));
    await expect(objects.fetch(published, await mkdtemp(join(dir, "swapped-")))).rejects.toMatchObject({ code: "BadGateway", message: expect.stringContaining("is not the manifest that was published") });
    // Forged manifests: each field is checked against the row and its range.
    const forge = async (meta: Record<string, unknown>, sizes: { state?: number } = {}) => {
      const bad = `microvms/vm-1/forged-${randomBytes(4).toString("hex")}`;
      // As if the row pinned the forged manifest: the fields are checked all the same.
      const { sha256: pinned, ...forged } = await store.publish(bad, { state: files.state, disk: files.disk }, { vm: "vm-1", qemuBuild: qemuBuild(), accelerator: "tcg", diskBytes: 2 ** 30, token: "t".repeat(32), guestPorts: [], layers: [], ...meta });
      let manifestSha256 = pinned;
      if (sizes.state !== undefined) {
        const body = JSON.stringify({ ...forged, files: { ...forged.files, state: { ...forged.files.state, bytes: sizes.state } } });
        await rawPut(`${bad}/manifest.json`, body);
        manifestSha256 = sha256(Buffer.from(body));
      }
      return objects.fetch({ ...row, suspended_object: bad, suspended_manifest: manifestSha256 }, await mkdtemp(join(dir, "forged-")));
    };
    await expect(forge({}, { state: 2 * 2 ** 30 })).rejects.toMatchObject({ message: expect.stringContaining("more than its limit") });
    await expect(forge({ diskBytes: 2 ** 50 })).rejects.toMatchObject({ message: expect.stringContaining("disk size out of range") });
    await expect(forge({ token: "short" })).rejects.toMatchObject({ message: expect.stringContaining("agent secret") });
    await expect(forge({ guestPorts: [0] })).rejects.toMatchObject({ message: expect.stringContaining("guest ports") });
    await expect(forge({ layers: Array.from({ length: 17 }, () => ({ sha256: "0".repeat(64), bytes: 1 })) })).rejects.toMatchObject({ message: expect.stringContaining("more than 16 layers") });
    await expect(forge({ layers: [{ sha256: "../../etc/passwd", bytes: 1 }] })).rejects.toMatchObject({ message: expect.stringContaining("invalid layer") });
    await expect(forge({ qemuBuild: "QEMU emulator version 0.1" })).rejects.toMatchObject({ code: "Conflict" });
    // A layer whose bytes in the store are not what the manifest says is refused, and not cached.
    const wrong = randomBytes(5000);
    await rawPut(`blobs/${sha256(wrong)}`, randomBytes(5000));
    await expect(forge({ layers: [{ sha256: sha256(wrong), bytes: 5000 }] })).rejects.toMatchObject({ code: "BadGateway", message: expect.stringContaining("sha256") });
    expect(await readdir(join(dir, "blobs"))).toEqual([layers[0]!.split("/").at(-1)]);
  });

  it("an image's snapshot is published once and pulled by another node with every file checked: a tampered blob is refused by name, another QEMU build's refused", async () => {
    const made = await mkdtemp(join(dir, "image-"));
    const layer = join(dir, "image-layer");
    await writeFile(layer, randomBytes(6000));
    await writeFile(join(made, "disk.qcow2"), randomBytes(4000));
    await writeFile(join(made, "state"), randomBytes(3000));
    await writeFile(join(made, "memory"), randomBytes(8000));
    const manifest: SnapshotManifest = {
      formatVersion: SNAPSHOT_FORMAT, createdAt: "", accelerator: "tcg", qemuBuild: qemuBuild(), vcpus: 1, memoryMiB: 128, kernel: "/theirs/vmlinuz", initramfs: "/theirs/initramfs",
      cmdline: "theirs", token: "t".repeat(32), guestPorts: [8080], diskBacking: [layer], diskBytes: 2 ** 30,
    };
    const objects = new ImageObjects(store, { blobsDir: join(dir, "image-blobs"), accelerator: "tcg", boot: { kernel: "/ours/vmlinuz", initramfs: "/ours/initramfs", cmdline: "ours" } });
    const { prefix, manifestSha256 } = await objects.publish("img-1", { dir: made, manifest });
    const published = { id: "img-1", vcpus: 1, memoryMiB: 128, diskGiB: 1, object: prefix, manifest: manifestSha256 };
    const pulled = join(await mkdtemp(join(dir, "pulled-")), "snapshot");
    await objects.pull(published, pulled);
    for (const f of ["disk.qcow2", "state", "memory"]) expect(await readFile(join(pulled, f))).toEqual(await readFile(join(made, f)));
    // Restored with this node's boot files, over the layers in its cache.
    const local = JSON.parse(await readFile(join(pulled, "manifest.json"), "utf8")) as SnapshotManifest;
    expect(local).toMatchObject({ kernel: "/ours/vmlinuz", initramfs: "/ours/initramfs", cmdline: "ours", token: manifest.token, guestPorts: [8080], diskBytes: 2 ** 30, qemuBuild: qemuBuild() });
    expect(await readFile(local.diskBacking[0]!)).toEqual(await readFile(layer));
    // A blob changed in the bucket is refused, naming the object, and nothing is left in place.
    const tampered = join(await mkdtemp(join(dir, "tampered-")), "snapshot");
    await rawPut(`${prefix}/memory`, randomBytes(8000));
    await expect(objects.pull(published, tampered)).rejects.toMatchObject({ code: "BadGateway", message: expect.stringContaining(`object ${prefix}/memory in the object store has sha256`) });
    expect(await readdir(join(tampered, ".."))).toEqual([]);
    // Another QEMU build's snapshot: refused before any file comes down, with the message a local one of another build gets.
    const other = await objects.publish("img-2", { dir: made, manifest: { ...manifest, qemuBuild: "QEMU emulator version 0.1" } });
    const refused = objects.pull({ ...published, id: "img-2", object: other.prefix, manifest: other.manifestSha256 }, join(dir, "never"));
    await expect(refused).rejects.toThrow(SnapshotIncompatibleError);
    await expect(refused).rejects.toThrow(/made by "QEMU emulator version 0.1"/);
    // Another image's bundle, or a shape other than the row's, is refused.
    await expect(objects.pull({ ...published, id: "img-3" }, join(dir, "never"))).rejects.toMatchObject({ code: "BadGateway", message: expect.stringContaining("another image") });
    await expect(objects.pull({ ...published, memoryMiB: 256 }, join(dir, "never"))).rejects.toMatchObject({ code: "BadGateway", message: expect.stringContaining("another shape") });
  });

  it("a managed root filesystem is made once per cluster: the first node builds and publishes it, the others link the checked blob; a tampered blob is built again", async () => {
    const db = await openDatabase(await mkdtemp(join(dir, "rootfs-db-")));
    try {
      const lines: string[] = [];
      const node = (id: string) => {
        const objects = new ImageObjects(store, { blobsDir: join(dir, `rootfs-blobs-${id}`), accelerator: "tcg", boot: { kernel: "/k", initramfs: "/i", cmdline: "c" } });
        return new ClusterSnapshots(db, objects, { nodeId: id, log: (l) => lines.push(`${id}: ${l}`) });
      };
      const target = { name: "rootfs-test", key: "0123456789abcdef", maxBytes: 64_000 };
      const disk = randomBytes(50_000);
      const builds: string[] = [];
      const make = (id: string, bytes: Buffer) => async (out: string) => {
        builds.push(id);
        await writeFile(join(out, "disk.qcow2"), bytes);
      };
      const outOf = async (id: string) => mkdtemp(join(dir, `rootfs-out-${id}-`));
      const [outA, outB] = [await outOf("a"), await outOf("b")];
      // Two nodes at once: the lock makes one build and the other pull.
      await Promise.all([node("a").rootfs(target, outA, make("a", disk)), node("b").rootfs(target, outB, make("b", disk))]);
      expect(builds).toHaveLength(1);
      for (const out of [outA, outB]) expect(await readFile(join(out, "disk.qcow2"))).toEqual(disk);
      expect(lines.some((l) => l.includes("rootfs-test (0123456789abcdef) published to the object store for the cluster"))).toBe(true);
      expect(lines.some((l) => /rootfs-test \(0123456789abcdef\) pulled from the object store in [\d.]+ s: node [ab] built it/.test(l))).toBe(true);
      // The bucket's copy changed: refused by its sha256, and built here instead.
      const row = await db.selectFrom("cluster_snapshots").selectAll().where("name", "=", target.name).executeTakeFirstOrThrow();
      await rawPut(`blobs/${sha256(disk)}`, randomBytes(50_000));
      const outC = await outOf("c");
      await node("c").rootfs(target, outC, make("c", disk));
      expect(builds).toEqual([builds[0], "c"]);
      expect(lines.some((l) => l.startsWith(`c: pulling rootfs-test (0123456789abcdef) made by node ${row.node_id}:`) && l.includes("building it here"))).toBe(true);
      // A bundle of another filesystem, or one past its size, is refused.
      const objects = new ImageObjects(store, { blobsDir: join(dir, "rootfs-blobs-d"), accelerator: "tcg", boot: { kernel: "/k", initramfs: "/i", cmdline: "c" } });
      await expect(objects.pullRootfs({ ...target, name: "rootfs-other", object: row.object, manifest: row.manifest })).rejects.toMatchObject({ code: "BadGateway", message: expect.stringContaining("is not root filesystem rootfs-other") });
      await expect(objects.pullRootfs({ ...target, maxBytes: 1000, object: row.object, manifest: row.manifest })).rejects.toMatchObject({ code: "BadGateway" });
    } finally {
      await closeDatabase(db);
    }
  });

  it("reads its configuration from COCOON_OBJECT_STORE_*, refusing what is malformed", () => {
    expect(objectStoreConfigFromEnv({})).toBeUndefined();
    const env = { COCOON_OBJECT_STORE_URL: "http://127.0.0.1:9000", COCOON_OBJECT_STORE_ACCESS_KEY_ID: "k", COCOON_OBJECT_STORE_SECRET_ACCESS_KEY: "s" };
    expect(objectStoreConfigFromEnv(env)).toEqual({ url: "http://127.0.0.1:9000", bucket: "cocoon", region: "us-east-1", accessKeyId: "k", secretAccessKey: "s" });
    expect(() => objectStoreConfigFromEnv({ ...env, COCOON_OBJECT_STORE_URL: "ftp://x" })).toThrow(/COCOON_OBJECT_STORE_URL/);
    expect(() => objectStoreConfigFromEnv({ ...env, COCOON_OBJECT_STORE_BUCKET: "Bad_Bucket" })).toThrow(/COCOON_OBJECT_STORE_BUCKET/);
    expect(() => objectStoreConfigFromEnv({ COCOON_OBJECT_STORE_URL: "http://h:1" })).toThrow(/ACCESS_KEY_ID/);
  });

  it("the bucket's sweep removes what nothing references once past its grace period: orphaned and cut-short bundles, unreferenced blobs; keeps referenced and young ones, and others' keys", async () => {
    const sweepDir = await mkdtemp(join(dir, "sweep-"));
    const db = await openDatabase(sweepDir);
    const bucket = new ObjectStore({ ...config, bucket: "cocoon-sweep" });
    await bucket.ensureBucket();
    const put = (key: string, body: string) => raw.send(new PutObjectCommand({ Bucket: "cocoon-sweep", Key: key, Body: body }));
    const keys = async () => {
      const all: string[] = [];
      for await (const page of bucket.list("")) all.push(...page.map((o) => o.key));
      return all.sort();
    };
    const file = async (name: string) => {
      await writeFile(join(sweepDir, name), `${name} ${randomBytes(8).toString("hex")}`);
      return join(sweepDir, name);
    };
    const blobOf = async (path: string) => `blobs/${sha256(await readFile(path))}`;
    const [shared, orphanOnly, referencedOnly] = [await file("shared-layer"), await file("orphan-layer"), await file("referenced-layer")];
    try {
      // Referenced by the database (a managed image's snapshot), on a layer of its own.
      const referenced = "images/managed-base-k1/0123456789abcdef";
      const kept = await bucket.publishLayered(referenced, { state: await file("r-state") }, [referencedOnly], { image: "managed-base-k1" });
      await db.insertInto("cluster_snapshots").values({ name: "base", key: "k1", object: referenced, manifest: kept.sha256, node_id: "a", created_at: "" }).execute();
      // A running VM's restore point (it opted in to be restored from it should its node fail): referenced while it runs.
      const restorePoint = "microvms/vm-restore/dddddddddddddddd";
      const point = await bucket.publishLayered(restorePoint, { state: await file("p-state") }, [referencedOnly], { vm: "vm-restore" });
      const now = new Date().toISOString();
      await db.insertInto("tenants").values({ id: "tnt-1", name: "acme", created_at: now }).execute();
      await db
        .insertInto("microvms")
        .values({
          id: "vm-restore", tenant_id: "tnt-1", image_name: "base", image_id: "base", state: "RUNNING", state_reason: null, vcpus: 1, memory_mib: 256, disk_gib: 2, env: "{}",
          suspend_after_seconds: 0, auto_resume: 1, max_runtime_seconds: 3600, egress: "{}", endpoint_public: 0, endpoint_token: "et", app_port: null, metadata: "{}",
          created_at: now, expires_at: now, last_activity_at: now, terminated_at: null, terminate_after_suspended_seconds: 0, suspended_at: null, egress_connectors: null,
          hooks: null, image_version: 1, forked_from: null, node_id: "a", node_epoch: 1, suspended_node: null, suspended_object: null, suspended_manifest: null,
          on_node_failure: "restore", restore_object: restorePoint, restore_manifest: point.sha256, restore_point_at: now,
        })
        .execute();
      // An orphan (its deletion failed), on a layer only it uses and one a later publish reuses.
      const orphan = "microvms/vm-orphan/aaaaaaaaaaaaaaaa";
      await bucket.publishLayered(orphan, { state: await file("o-state"), disk: await file("o-disk") }, [orphanOnly, shared], { vm: "vm-orphan" });
      // An upload cut short (files, no manifest), a blob nothing names, and keys that are not Cocoon's.
      await put("microvms/vm-cut/bbbbbbbbbbbbbbbb/state", "half");
      const stray = `blobs/${"e".repeat(64)}`;
      await put(stray, "stray");
      const foreign = ["images/weird key", "microvms/vm-x/not-hex/state", "microvms/../../etc/passwd", "other/thing", "blobs/not-a-hash", "images/img-1/0123456789abcdef/nested/deep"];
      for (const key of foreign) await put(key, "not ours");
      // A multipart upload its node never completed nor aborted (it died).
      await raw.send(new CreateMultipartUploadCommand({ Bucket: "cocoon-sweep", Key: "microvms/vm-cut/bbbbbbbbbbbbbbbb/disk" }));
      // Past the grace period, a publish in flight: its files young, not yet referenced, reusing the shared layer (old now).
      await new Promise((r) => setTimeout(r, 4000));
      const young = "microvms/vm-young/cccccccccccccccc";
      await bucket.publishLayered(young, { state: await file("y-state") }, [shared], { vm: "vm-young" });
      const log: string[] = [];
      const sweep = new BucketSweep(db, bucket, { graceSeconds: 2, maxKeysPerPass: 1000, log: (l) => log.push(l) });
      expect(await sweep.pass()).toEqual({ bundlesDeleted: 2, blobsDeleted: 2, uploadsAborted: 1, complete: true });
      expect(await keys()).toEqual(
        [
          ...foreign,
          `${referenced}/manifest.json`,
          `${referenced}/state`,
          `${restorePoint}/manifest.json`,
          `${restorePoint}/state`,
          await blobOf(referencedOnly),
          await blobOf(shared),
          `${young}/manifest.json`,
          `${young}/state`,
        ].sort(),
      );
      expect(await bucket.head(await blobOf(orphanOnly))).toBeUndefined();
      expect(await bucket.head(stray)).toBeUndefined();
      // Nothing more to take; at a cap of a few keys a pass, passes go on where the last stopped until the bucket is swept.
      await db.deleteFrom("cluster_snapshots").execute();
      await db.updateTable("microvms").set({ restore_object: null, restore_manifest: null }).execute();
      await new Promise((r) => setTimeout(r, 3000));
      const capped = new BucketSweep(db, bucket, { graceSeconds: 2, maxKeysPerPass: 3 });
      const passes = [];
      for (let i = 0; i < 8; i++) passes.push(await capped.pass());
      expect(passes[0]).toMatchObject({ complete: false });
      expect(passes.reduce((n, p) => n + p.bundlesDeleted, 0)).toBe(3);
      expect(passes.reduce((n, p) => n + p.blobsDeleted, 0)).toBe(2);
      expect(await keys()).toEqual([...foreign].sort());
      expect(log.filter((l) => l.includes("failed"))).toEqual([]);
    } finally {
      await closeDatabase(db);
      bucket.destroy();
    }
  }, 30_000);

  it("a blob a publish reuses, written long ago, is written again (server-side) so the sweep's grace period covers the publish", async () => {
    const layer = join(dir, "refreshed-layer");
    await writeFile(layer, randomBytes(3000));
    const { sha256: hash } = await store.putBlob(layer);
    const before = (await store.head(`blobs/${hash}`))!.lastModified!;
    await new Promise((r) => setTimeout(r, 1100));
    await store.putBlob(layer);
    expect((await store.head(`blobs/${hash}`))!.lastModified).toEqual(before);
    vi.useFakeTimers({ toFake: ["Date"], now: Date.now() + BLOB_REFRESH_MS + 60_000 });
    try {
      await store.putBlob(layer);
    } finally {
      vi.useRealTimers();
    }
    expect((await store.head(`blobs/${hash}`))!.lastModified!.getTime()).toBeGreaterThan(before.getTime());
    expect(await store.getBlob({ sha256: hash, bytes: 3000 }, join(dir, "refreshed-blobs")).then((p) => readFile(p))).toEqual(await readFile(layer));
  });
});
