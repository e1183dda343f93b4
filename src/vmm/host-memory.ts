import { readFile } from "node:fs/promises";
import { totalmem } from "node:os";

/**
 * How the host's memory is split: `reserveMiB` is never given to VMs (the
 * server, the OS, the page cache); `vmMemoryMiB` is what all VMs' QEMU
 * processes together may use, enforced by the limit of their parent cgroup
 * (src/vmm/jail), so VMs that all start allocating at once are OOM-killed
 * among themselves (the biggest first) and never take the server's memory.
 */
export interface HostMemoryBudget {
  reserveMiB: number;
  vmMemoryMiB: number;
}

/**
 * COCOON_MEMORY_RESERVE_MIB (default: a tenth of host memory, at least
 * 1 GiB) and COCOON_VM_MEMORY_MIB (default: the rest); a bad value is an
 * error naming the variable and its limits.
 */
export function hostMemoryBudget(env = process.env, totalMiB = Math.floor(totalmem() / 2 ** 20)): HostMemoryBudget {
  const read = (name: string, fallback: number, max: number) => {
    const raw = env[name];
    if (raw === undefined || raw === "") return fallback;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 64 || n > max) throw new Error(`${name} must be an integer between 64 and ${max} (MiB of this host's ${totalMiB}), got "${raw}"`);
    return n;
  };
  const reserveMiB = read("COCOON_MEMORY_RESERVE_MIB", Math.min(Math.max(1024, Math.round(totalMiB / 10)), Math.floor(totalMiB / 2)), totalMiB - 64);
  const vmMemoryMiB = read("COCOON_VM_MEMORY_MIB", totalMiB - reserveMiB, totalMiB - reserveMiB);
  return { reserveMiB, vmMemoryMiB };
}

/** The host's MemAvailable (what can be allocated without swapping), in MiB. */
export async function memAvailableMiB(): Promise<number> {
  const meminfo = await readFile("/proc/meminfo", "utf8");
  return Number(/^MemAvailable:\s+(\d+) kB/m.exec(meminfo)?.[1] ?? 0) / 1024;
}

/**
 * The memory a process holds alone, in MiB: its resident anonymous and shmem
 * pages (`RssAnon` + `RssShmem` of /proc/<pid>/status; for a QEMU: its heap,
 * TCG's code and TLBs, and the guest RAM it wrote or that is its own), or
 * undefined once it is gone. File pages it maps (a snapshot's memory file,
 * libraries) are shared page cache, counted once in MemAvailable. The kernel
 * keeps these counters as it goes, so a read costs ~20 µs, where PSS
 * (smaps_rollup) walks every mapping: 1–3 ms a QEMU, up to a second for a
 * dense host at every admission.
 */
export async function privateMemoryMiB(pid: number): Promise<number | undefined> {
  try {
    const status = await readFile(`/proc/${pid}/status`, "utf8");
    const anonKb = /^RssAnon:\s+(\d+) kB/m.exec(status)?.[1];
    const shmemKb = /^RssShmem:\s+(\d+) kB/m.exec(status)?.[1];
    return anonKb === undefined || shmemKb === undefined ? undefined : (Number(anonKb) + Number(shmemKb)) / 1024;
  } catch {
    return undefined;
  }
}
