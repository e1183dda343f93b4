import type { AgentClient } from "../vmm/agent-client.ts";

export interface VmSample {
  at: string;
  cpuPercent: number;
  memoryUsedMiB: number;
}

export interface VmMetrics extends VmSample {
  diskUsedMiB: number;
  netRxBytes: number;
  netTxBytes: number;
  samples: VmSample[];
}

interface GuestStats {
  memTotalBytes: number;
  memAvailableBytes: number;
  cpuTotalTicks: number;
  cpuIdleTicks: number;
  diskUsedBytes: number;
  netRxBytes: number;
  netTxBytes: number;
}

const MiB = 2 ** 20;

/**
 * Recent resource samples per VM, read from the guest's agent. CPU percent
 * is the busy share of guest CPU ticks between two readings, so the first
 * reading of a VM reports 0. Keeps `keep` samples per VM, in memory only.
 *
 * An idle VM costs its host nothing unless someone looks: the guest is read
 * when its metrics are asked for, and then every interval only while they
 * keep being asked for (within `watchMs`), so a dashboard sees a history
 * while hundreds of unwatched VMs are never woken.
 */
export class VmSampler {
  private readonly history = new Map<string, { last?: GuestStats; samples: VmSample[]; askedAt: number }>();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly keep = 60,
    private readonly watchMs = 5 * 60_000,
  ) {}

  /** Every `intervalMs`, samples those of the VMs `running()` returns whose metrics were asked for within `watchMs`. */
  start(running: () => Promise<{ id: string; agent: AgentClient }[]>, intervalMs = 5000): void {
    this.timer = setInterval(() => {
      const since = Date.now() - this.watchMs;
      const watched = (id: string) => (this.history.get(id)?.askedAt ?? 0) >= since;
      void running().then((vms) => Promise.all(vms.filter((vm) => watched(vm.id)).map((vm) => this.read(vm.id, vm.agent).catch(() => undefined))));
    }, intervalMs);
  }

  stop(): void {
    clearInterval(this.timer);
  }

  forget(id: string): void {
    this.history.delete(id);
  }

  /** What is known without asking the guest (a VM that is not running): zeros now, and its past samples. */
  recent(id: string): VmMetrics {
    const samples = [...(this.history.get(id)?.samples ?? [])];
    return { at: new Date().toISOString(), cpuPercent: 0, memoryUsedMiB: 0, diskUsedMiB: 0, netRxBytes: 0, netTxBytes: 0, samples };
  }

  /** Reads the guest now (someone asked: the VM is watched from now on), records a sample, and returns current figures with the recent samples. */
  async sample(id: string, agent: AgentClient): Promise<VmMetrics> {
    const metrics = await this.read(id, agent);
    this.history.get(id)!.askedAt = Date.now();
    return metrics;
  }

  private async read(id: string, agent: AgentClient): Promise<VmMetrics> {
    const stats = (await agent.stats()) as unknown as GuestStats;
    const h = this.history.get(id) ?? { samples: [], askedAt: 0 };
    this.history.set(id, h);
    const busy = h.last ? stats.cpuTotalTicks - h.last.cpuTotalTicks - (stats.cpuIdleTicks - h.last.cpuIdleTicks) : 0;
    const total = h.last ? stats.cpuTotalTicks - h.last.cpuTotalTicks : 0;
    const sample: VmSample = {
      at: new Date().toISOString(),
      cpuPercent: total > 0 ? Math.round((busy / total) * 1000) / 10 : 0,
      memoryUsedMiB: Math.round((stats.memTotalBytes - stats.memAvailableBytes) / MiB),
    };
    h.last = stats;
    h.samples.push(sample);
    if (h.samples.length > this.keep) h.samples.shift();
    return {
      ...sample,
      diskUsedMiB: Math.round(stats.diskUsedBytes / MiB),
      netRxBytes: stats.netRxBytes,
      netTxBytes: stats.netTxBytes,
      samples: [...h.samples],
    };
  }
}
