import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { writeCaptureManifest, type VmCapture } from "../../src/vmm/capture.ts";
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
