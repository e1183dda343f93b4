import { describe, expect, it } from "vitest";
import { VOLUME_SLOTS, volumeArgs, volumeSerial } from "../../src/vmm/qemu.ts";
import { volumeFile } from "../../src/vmm/volumes.ts";

describe("volume slots", () => {
  const blockdevs = (args: string[]) => args.filter((_, i) => args[i - 1] === "-blockdev").map((a) => JSON.parse(a) as Record<string, unknown>);
  const devices = (args: string[]) => args.filter((_, i) => args[i - 1] === "-device");

  it("are always all there: zero-size writable placeholders where no volume is, found by serial", () => {
    const args = volumeArgs([]);
    expect(blockdevs(args)).toEqual(Array.from({ length: VOLUME_SLOTS }, (_, slot) => ({ driver: "null-co", "node-name": `vol${slot}`, size: 0 })));
    expect(devices(args)).toEqual(Array.from({ length: VOLUME_SLOTS }, (_, slot) => `virtio-blk-device,drive=vol${slot},serial=${volumeSerial(slot)}`));
  });

  it("put volume files behind the first slots, read-only where asked, and hold at most VOLUME_SLOTS", () => {
    const nodes = blockdevs(volumeArgs([{ path: "/v/a.raw", readOnly: false }, { path: "/v/b.raw", readOnly: true }]));
    expect(nodes[0]).toEqual({ driver: "raw", "node-name": "vol0", "read-only": false, file: { driver: "file", filename: "/v/a.raw", "read-only": false } });
    expect(nodes[1]).toMatchObject({ "read-only": true, file: { filename: "/v/b.raw", "read-only": true } });
    expect(nodes.slice(2).every((n) => n.driver === "null-co")).toBe(true);
    expect(() => volumeArgs(Array.from({ length: VOLUME_SLOTS + 1 }, () => ({ path: "/v/a.raw", readOnly: true })))).toThrow(/at most/);
  });

  it("name files only after ids the server made", () => {
    expect(volumeFile("/data", "vol-0123456789ab")).toBe("/data/volumes/vol-0123456789ab.raw");
    for (const id of ["../x", "vol-0123456789ab/../../etc", "vol-XYZ", ""]) expect(() => volumeFile("/data", id)).toThrow(/not a volume id/);
  });
});
