import { describe, expect, it } from "vitest";
import { decideAdmission, IDLE_VM_FLOOR_MIB, startingVmMiB, type HostCapacity, type HostUsage } from "../../src/lifecycle/admission.ts";
import { hostMemoryBudget } from "../../src/vmm/host-memory.ts";

const shape = { vcpus: 1, memoryMiB: 256 };
const capacity: HostCapacity = { vcpus: 256, memoryMiB: 4 * 24_000, real: { reserveMiB: 2400, vmMemoryMiB: 21_600 } };
const idle = (n: number, pss = 45) => Array.from({ length: n }, () => pss);
const usage = (over: { vcpus?: number; memoryMiB?: number; real?: Partial<NonNullable<HostUsage["real"]>> } = {}): HostUsage => ({
  vcpus: over.vcpus ?? 10,
  memoryMiB: over.memoryMiB ?? 2560,
  real: { memAvailableMiB: 20_000, vmPrivateMiB: idle(10), vmsMappedFileMiB: 0, buildsMiB: 0, ...over.real },
});

describe("decideAdmission", () => {
  it("admits idle VMs by what they use, far beyond their nominal memory", () => {
    // 199 idle 256 MiB VMs (50 GiB nominal, 9 GiB real) on a 24 GiB host: the 200th fits.
    const u = usage({ vcpus: 199, memoryMiB: 199 * 256, real: { vmPrivateMiB: idle(199), memAvailableMiB: 13_000 } });
    expect(decideAdmission(shape, u, capacity)).toEqual({ admitted: true });
  });

  it.each([
    ["vcpus", usage({ vcpus: 256 }), "256 of 256 vcpus in use, 1 more requested"],
    ["memoryMiB", usage({ memoryMiB: 96_000 }), "96000 of 96000 memoryMiB committed, 256 more requested"],
    ["vmMemoryMiB", usage({ real: { vmPrivateMiB: idle(400, 54) } }), "VMs use 21600 of the 21600 MiB all VMs may use, a new one about 64 MiB"],
    ["hostMemoryMiB", usage({ real: { memAvailableMiB: 2450 } }), "2450 MiB of host memory available, 2400 MiB kept in reserve, a new VM takes about 64 MiB"],
  ])("refuses on %s, naming the limit", (resource, u, message) => {
    const d = decideAdmission(shape, u, capacity);
    expect(d).toMatchObject({ admitted: false, resource, message: `host is at capacity: ${message}` });
  });

  it("counts VMs still starting at the size of a measured one, against both the VMs' budget and the host's reserve", () => {
    const starting = Array.from({ length: 30 }, () => undefined);
    // 30 starting VMs at 64 MiB each are 1920 MiB the host's MemAvailable does not show yet.
    expect(decideAdmission(shape, usage({ real: { memAvailableMiB: 4380, vmPrivateMiB: [...idle(10), ...starting] } }), capacity)).toMatchObject({
      admitted: false,
      resource: "hostMemoryMiB",
    });
    expect(decideAdmission(shape, usage({ real: { memAvailableMiB: 4500, vmPrivateMiB: [...idle(10), ...starting] } }), capacity)).toEqual({ admitted: true });
  });

  it("counts the file pages VMs map once, beside each VM's private memory", () => {
    // 390 VMs holding 54 MiB each alone (21,060 MiB) fit with room for one more; the 600 MiB of
    // snapshot memory files they share fill the budget.
    expect(decideAdmission(shape, usage({ real: { vmPrivateMiB: idle(390, 54) } }), capacity)).toEqual({ admitted: true });
    expect(decideAdmission(shape, usage({ real: { vmPrivateMiB: idle(390, 54), vmsMappedFileMiB: 600 } }), capacity)).toMatchObject({
      admitted: false,
      resource: "vmMemoryMiB",
      used: 21_660,
    });
  });

  it("counts image builds at their full size and refuses a VM bigger than all VMs may use", () => {
    expect(decideAdmission(shape, usage({ real: { buildsMiB: 21_200 } }), capacity)).toMatchObject({ admitted: false, resource: "vmMemoryMiB" });
    expect(decideAdmission({ vcpus: 1, memoryMiB: 32_768 }, usage(), capacity)).toMatchObject({ admitted: false, resource: "vmMemoryMiB" });
  });

  it("checks committed limits only where no real limits are configured", () => {
    const committed: HostCapacity = { vcpus: 4, memoryMiB: 2048 };
    expect(decideAdmission(shape, { vcpus: 3, memoryMiB: 1792 }, committed)).toEqual({ admitted: true });
    expect(decideAdmission(shape, { vcpus: 3, memoryMiB: 1793 }, committed)).toMatchObject({ admitted: false, resource: "memoryMiB" });
  });
});

describe("startingVmMiB", () => {
  it("is the median measured VM, at least the floor", () => {
    expect(startingVmMiB([])).toBe(IDLE_VM_FLOOR_MIB);
    expect(startingVmMiB([40, undefined, 50])).toBe(IDLE_VM_FLOOR_MIB);
    expect(startingVmMiB([70, 300, 80, undefined])).toBe(80);
  });
});

describe("hostMemoryBudget", () => {
  it("keeps a tenth of the host, at least 1 GiB, and gives VMs the rest; names a bad setting", () => {
    expect(hostMemoryBudget({}, 24_000)).toEqual({ reserveMiB: 2400, vmMemoryMiB: 21_600 });
    expect(hostMemoryBudget({}, 4096)).toEqual({ reserveMiB: 1024, vmMemoryMiB: 3072 });
    expect(hostMemoryBudget({ COCOON_MEMORY_RESERVE_MIB: "256", COCOON_VM_MEMORY_MIB: "600" }, 24_000)).toEqual({ reserveMiB: 256, vmMemoryMiB: 600 });
    expect(() => hostMemoryBudget({ COCOON_VM_MEMORY_MIB: "30000" }, 24_000)).toThrow("COCOON_VM_MEMORY_MIB must be an integer between 64 and 21600 (MiB of this host's 24000), got \"30000\"");
    expect(() => hostMemoryBudget({ COCOON_MEMORY_RESERVE_MIB: "lots" }, 24_000)).toThrow("COCOON_MEMORY_RESERVE_MIB must be an integer");
  });
});
