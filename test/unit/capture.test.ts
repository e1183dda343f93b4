import { execFileSync } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { forkLayers, prepareCapture, writeCaptureManifest, type VmCapture } from "../../src/vmm/capture.ts";
import { backingNodes, blockdevArgs, rootNode } from "../../src/vmm/qemu.ts";
import { loadSnapshot, qemuBuild, SNAPSHOT_FORMAT, type Snapshot } from "../../src/vmm/snapshot.ts";
import { MicroVm, type VmRecord } from "../../src/vmm/vm.ts";

const dir = await mkdtemp(join(tmpdir(), "cocoon-capture-"));
afterAll(() => rm(dir, { recursive: true, force: true }));

/** The image a VM was launched from: its disk sits on a chain the server set up. */
const image: Snapshot = {
  dir: "/images/img-parent/snapshot",
  manifest: {
    formatVersion: SNAPSHOT_FORMAT,
    createdAt: "2026-11-24T00:00:00.000Z",
    accelerator: "tcg",
    qemuBuild: qemuBuild(),
    vcpus: 1,
    memoryMiB: 512,
    kernel: "/assets/kernel",
    initramfs: "/assets/initramfs",
    cmdline: "console=ttyS0",
    token: "image-secret",
    guestPorts: [8080],
    diskBacking: ["/assets/rootfs.qcow2"],
    diskBytes: 2 * 2 ** 30,
  },
};

describe("a snapshot of a running VM", () => {
  it("names its disk chain explicitly (captured layers, then its image's chain) and says its RAM is in the state", async () => {
    const record = { id: "vm-1", vcpus: 2, memoryMiB: 1024, diskBytes: 4 * 2 ** 30, token: "vm-secret", forwards: [{ hostPort: 40001, guestPort: 8080 }, { hostPort: 40002, guestPort: 3000 }], agentPort: 40000 } as VmRecord;
    const capture: VmCapture = { dir, token: "vm-secret", state: join(dir, "state"), layers: [join(dir, "disk.qcow2"), join(dir, "layer-1.qcow2")], pauseMs: 12 };
    const snapshot = await writeCaptureManifest(capture, new MicroVm("/vms/vm-1", record), image);
    expect(snapshot.manifest).toMatchObject({
      ramInState: true,
      token: "vm-secret",
      vcpus: 2,
      memoryMiB: 1024,
      diskBytes: 4 * 2 ** 30,
      guestPorts: [8080, 3000],
      kernel: "/assets/kernel",
      diskBacking: [join(dir, "layer-1.qcow2"), "/images/img-parent/snapshot/disk.qcow2", "/assets/rootfs.qcow2"],
    });
    // Written where a launch reads it, and readable by this host.
    expect(JSON.parse(await readFile(join(dir, "manifest.json"), "utf8"))).toEqual(snapshot.manifest);
    expect((await loadSnapshot(dir, { accelerator: "tcg" })).manifest.diskBacking).toEqual(snapshot.manifest.diskBacking);
  });
});

describe("a fork child started during its parent's capture", () => {
  it("links the capture's layer before it is written, and sees what the capture then writes in place", async () => {
    const capture = join(dir, ".fork-1");
    const child = join(dir, "child");
    await mkdir(child);
    const older = join(dir, "parent-layer-0.qcow2");
    await writeFile(older, "older layer");
    const state = { path: join(capture, "state"), layout: "stream" as const };
    await prepareCapture(capture, state);
    const layers = await forkLayers(capture, { diskLayers: [older] } as VmRecord, child);
    expect(layers).toEqual([join(child, "layer-0.qcow2"), join(child, "layer-1.qcow2")]);
    expect(await readFile(layers[0]!, "utf8")).toBe("");
    // The capture's disk copy (captureVm: cp onto the prepared file) lands in the child's link.
    await writeFile(join(dir, "copied"), "captured overlay");
    execFileSync("cp", ["--sparse=always", join(dir, "copied"), join(capture, "disk.qcow2")]);
    expect(await readFile(layers[0]!, "utf8")).toBe("captured overlay");
    expect(await readFile(layers[1]!, "utf8")).toBe("older layer");
    // A second capture into the same directory is refused, not mixed.
    await expect(prepareCapture(capture, state)).rejects.toThrow();
  });

  it("opens its disk over no backing, and binds the same chain a disk started with it has", () => {
    const disk = { path: "/vms/c/disk.qcow2", backing: ["/vms/c/layer-0.qcow2", "/images/i/disk.qcow2"] };
    const nodes = (args: string[]) => args.filter((_, i) => i % 2 === 1).map((a) => JSON.parse(a) as Record<string, unknown>);
    const late = nodes(blockdevArgs({ ...disk, backingLater: true }));
    expect(late.map((n) => n["node-name"])).toEqual(["root-file", "root"]);
    expect(late[1]).toMatchObject({ backing: null });
    // Bound later (Machine.bindBacking): the chain's nodes, then root reopened over them, as at a start with the chain.
    expect([...backingNodes(disk), late[0], rootNode(disk)]).toEqual(nodes(blockdevArgs(disk)));
    expect(rootNode(disk)).toMatchObject({ "node-name": "root", backing: "backing1", file: "root-file" });
  });
});
