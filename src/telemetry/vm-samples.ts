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
 */
export class VmSampler {
  private readonly history = new Map<string, { last?: GuestStats; samples: VmSample[] }>();
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly keep = 60) {}

  /** Samples every `intervalMs` the VMs `running()` returns. */
  start(running: () => Promise<{ id: string; agent: AgentClient }[]>, intervalMs = 5000): void {
    this.timer = setInterval(() => {
      void running().then((vms) => Promise.all(vms.map((vm) => this.sample(vm.id, vm.agent).catch(() => undefined))));
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

  /** Reads the guest now, records a sample, and returns current figures with the recent samples. */
  async sample(id: string, agent: AgentClient): Promise<VmMetrics> {
    const stats = (await agent.stats()) as unknown as GuestStats;
    const h = this.history.get(id) ?? { samples: [] };
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
