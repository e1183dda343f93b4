/**
 * Admission control, pure: whether the host takes one more VM. Two kinds of
 * limit: committed (vCPUs and guest memory as requested, with overcommit) and
 * real (what the live VMs' QEMUs hold now, their private memory, and the
 * host's MemAvailable above a reserve). Idle sandboxes use a fraction of their
 * nominal memory, so the real limits are what let a host hold hundreds of
 * them; the VMs' parent cgroup (vmMemoryMiB) keeps the server safe when they
 * all start allocating at once.
 */

export interface HostCapacity {
  /** vCPUs the host admits across live VMs (cores × overcommit). */
  vcpus: number;
  /** Guest memory the host admits across live VMs (host memory × overcommit). */
  memoryMiB: number;
  /** Limits on real use; absent: committed limits only. */
  real?: {
    /** Host memory never given to VMs: a VM is refused if MemAvailable would fall below it. */
    reserveMiB: number;
    /** What all VMs' QEMUs together may use (their parent cgroup's limit). */
    vmMemoryMiB: number;
  };
}

export interface HostUsage {
  /** vCPUs and guest memory committed to live VMs and image builds. */
  vcpus: number;
  memoryMiB: number;
  /** Readings of real use (with HostCapacity.real). */
  real?: {
    memAvailableMiB: number;
    /** Each live VM's QEMU private memory (host-memory.ts privateMemoryMiB); undefined where there is no reading yet (it is starting). */
    vmPrivateMiB: (number | undefined)[];
    /** The file pages they map (snapshots' memory files, libraries): shared, counted once. */
    vmsMappedFileMiB: number;
    /** Image builds' VMs, counted at their full size: a build allocates. */
    buildsMiB: number;
  };
}

export type Admission = { admitted: true } | { admitted: false; resource: string; used: number; capacity: number; message: string };

/**
 * What a VM with no reading yet is assumed to use: the median of the measured
 * VMs, at least IDLE_VM_FLOOR_MIB (a restored base VM's QEMU under TCG, about 40 MiB, rounded up).
 */
export const IDLE_VM_FLOOR_MIB = 64;

export function startingVmMiB(vmPrivateMiB: (number | undefined)[]): number {
  const measured = vmPrivateMiB.filter((v): v is number => v !== undefined).sort((a, b) => a - b);
  const median = measured.length ? measured[Math.floor(measured.length / 2)]! : 0;
  return Math.max(IDLE_VM_FLOOR_MIB, Math.ceil(median));
}

export function decideAdmission(shape: { vcpus: number; memoryMiB: number }, usage: HostUsage, capacity: HostCapacity): Admission {
  const refuse = (resource: string, used: number, cap: number, message: string): Admission => ({ admitted: false, resource, used, capacity: cap, message: `host is at capacity: ${message}` });
  if (usage.vcpus + shape.vcpus > capacity.vcpus) {
    return refuse("vcpus", usage.vcpus, capacity.vcpus, `${usage.vcpus} of ${capacity.vcpus} vcpus in use, ${shape.vcpus} more requested`);
  }
  if (usage.memoryMiB + shape.memoryMiB > capacity.memoryMiB) {
    return refuse("memoryMiB", usage.memoryMiB, capacity.memoryMiB, `${usage.memoryMiB} of ${capacity.memoryMiB} memoryMiB committed, ${shape.memoryMiB} more requested`);
  }
  if (!capacity.real || !usage.real) return { admitted: true };
  const { reserveMiB, vmMemoryMiB } = capacity.real;
  const r = usage.real;
  const starting = startingVmMiB(r.vmPrivateMiB);
  const unmeasured = r.vmPrivateMiB.filter((v) => v === undefined).length * starting;
  const vmsUse = Math.ceil(r.vmPrivateMiB.reduce<number>((sum, v) => sum + (v ?? starting), 0) + r.vmsMappedFileMiB + r.buildsMiB);
  if (shape.memoryMiB > vmMemoryMiB) {
    return refuse("vmMemoryMiB", vmsUse, vmMemoryMiB, `a VM of ${shape.memoryMiB} MiB could never fit in the ${vmMemoryMiB} MiB all VMs may use`);
  }
  if (vmsUse + starting > vmMemoryMiB) {
    return refuse("vmMemoryMiB", vmsUse, vmMemoryMiB, `VMs use ${vmsUse} of the ${vmMemoryMiB} MiB all VMs may use, a new one about ${starting} MiB`);
  }
  const available = Math.floor(r.memAvailableMiB - unmeasured);
  if (available - starting < reserveMiB) {
    return refuse("hostMemoryMiB", available, reserveMiB, `${available} MiB of host memory available, ${reserveMiB} MiB kept in reserve, a new VM takes about ${starting} MiB`);
  }
  return { admitted: true };
}
