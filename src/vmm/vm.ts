import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { checkIntRange } from "../errors.ts";
import { AgentClient } from "./agent-client.ts";
import type { Machine } from "./machine.ts";
import type { VmNetworkRecord } from "./network/index.ts";
import type { PortForward } from "./qemu.ts";
import { ReleaseStack } from "./release-stack.ts";
import { snapshotDisk, type Snapshot } from "./snapshot.ts";
import type { VolumeAttachment } from "./volumes.ts";

/**
 * Where a VM's process stands on the host: the engine's own vocabulary,
 * distinct from the API's MicroVM states (lifecycle/states.ts), which the
 * lifecycle derives from it.
 *
 *   starting ──> running ⇄ paused
 *   running|paused ──suspend──> suspended ──resume──> running
 *   running|paused ──(process died)──> failed
 */
export type VmStatus = "starting" | "running" | "paused" | "suspended" | "failed";

/** A VM's runtime record, `vms/<id>/vm.json`: enough to re-adopt or resume it after a server restart. */
export interface VmRecord {
  id: string;
  /**
   * Its QEMU processes' name (`-name`) and jail cgroup: the id it was
   * created with. A warm VM handed out under another id keeps its name.
   */
  processName: string;
  status: VmStatus;
  failureReason?: string;
  snapshotDir: string;
  vcpus: number;
  memoryMiB: number;
  /** The root disk's size (its overlay's virtual size). */
  diskBytes: number;
  /**
   * A forked VM's own read-only copies of the disk layers it was forked
   * with (in its directory, nearest first): its overlay sits on them, and
   * they on the snapshot's disk. Absent for a VM launched from a snapshot.
   */
  diskLayers?: string[];
  /** Volumes behind its volume slots, in slot order (vmm/volumes.ts); kept for every restore of its process. */
  volumes?: VolumeAttachment[];
  /**
   * `diskLayers` is the disk's whole backing chain, with no snapshot disk
   * under it: a VM moved from another node (`Engine.importSuspended`), whose
   * layers came from the object store.
   */
  diskLayersComplete?: boolean;
  /** A warm-pool VM not yet handed out; discarded on restart. */
  pooled?: boolean;
  /** Secret the guest's agent holds now (running) or held when suspended; rotated on every launch and resume. */
  token: string;
  /** QEMU pid (on the host) while running. */
  pid?: number;
  /** The uid (= gid) the VM's QEMU and passt run as. */
  uid: number;
  agentPort: number;
  /** Guest app ports and the host loopback ports they are reachable on. */
  forwards: PortForward[];
  /** Egress policy and its host-side identity. */
  network: VmNetworkRecord;
  createdAt: string;
}

/** Files of a VM's directory besides its QEMU process's (`machinePaths`); the directory is root's (0700). */
export const vmFiles = (dir: string) => ({
  record: join(dir, "vm.json"),
  /** The qcow2 overlay: the only file in the directory the VM's uid owns. */
  disk: join(dir, "disk.qcow2"),
  suspended: join(dir, "suspended.state"),
  suspending: join(dir, "suspended.state.tmp"),
});

/** The backing chain of a VM's overlay, nearest first: its own layers, then (unless they are all of it) its snapshot's disk and that disk's chain. */
export function diskBackingOf(record: Pick<VmRecord, "diskLayers" | "diskLayersComplete">, snapshot: Snapshot): string[] {
  const own = record.diskLayers ?? [];
  if (record.diskLayersComplete) return own;
  const base = snapshotDisk(snapshot);
  return [...own, base.path, ...base.backing];
}

/** A VM the engine manages. `agent` is usable while status is "running". */
export class MicroVm {
  machine: Machine | undefined;
  agent: AgentClient;
  /** What the VM holds for its whole life: its uid and its directory. */
  readonly host = new ReleaseStack();
  /** What its current QEMU process holds: the process, its jail and its network. Absent while it has none. */
  process: ReleaseStack | undefined;

  constructor(
    public dir: string,
    public record: VmRecord,
  ) {
    this.agent = new AgentClient(record.agentPort, record.token);
  }

  get id(): string {
    return this.record.id;
  }

  get status(): VmStatus {
    return this.record.status;
  }

  /** Host loopback port where a guest port is forwarded, if it is. */
  hostPort(guestPort: number): number | undefined {
    return this.record.forwards.find((f) => f.guestPort === guestPort)?.hostPort;
  }
}

/** Per-VM limits (docs/api.md). */
export const VM_LIMITS = { vcpus: { min: 1, max: 16 }, memoryMiB: { min: 128, max: 32768 }, diskGiB: { min: 1, max: 32 } } as const;

export function checkShape(shape: { vcpus: number; memoryMiB: number }): void {
  checkIntRange("vcpus", shape.vcpus, VM_LIMITS.vcpus);
  checkIntRange("memoryMiB", shape.memoryMiB, VM_LIMITS.memoryMiB);
}

export const newToken = () => randomBytes(24).toString("base64url");

export function newVmId(): string {
  return `vm-${randomBytes(8).toString("hex")}`;
}
