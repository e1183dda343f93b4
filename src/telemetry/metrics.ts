import { Gauge, Histogram, Registry } from "prom-client";

/** `fork`: a whole fork call (all its children running); `snapshot_pause`: how long a snapshot or fork stopped the source VM. */
/** publish, fetch: a suspended VM to and from the cluster's object store (docs/cluster.md). */
export type TimedOperation = "launch" | "suspend" | "resume" | "fork" | "snapshot_pause" | "publish" | "fetch";

/** Receives operation latencies from the lifecycle. */
export interface LifecycleObserver {
  observe(op: TimedOperation, seconds: number): void;
}

/**
 * Prometheus metrics of the server (GET /metrics): VMs by state, launch /
 * suspend / resume latency histograms, host capacity and what is in use.
 * Gauges are read from their sources at scrape time, so they never drift.
 */
export class ServerMetrics implements LifecycleObserver {
  readonly registry = new Registry();
  private readonly latency: Record<TimedOperation, Histogram>;

  constructor(sources: {
    vmsByState: () => Promise<Record<string, number>>;
    capacity: () => Promise<{ vcpus: number; memoryMiB: number; usedVcpus: number; usedMemoryMiB: number }>;
  }) {
    // Buckets span a warm-pool launch (~0.1 s) to a loaded host's resume (~10 s).
    const buckets = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30];
    const histogram = (op: TimedOperation) =>
      new Histogram({ name: `cocoon_microvm_${op}_seconds`, help: `Time to ${op} a microVM, as the API caller sees it`, buckets, registers: [this.registry] });
    this.latency = { launch: histogram("launch"), suspend: histogram("suspend"), resume: histogram("resume"), fork: histogram("fork"), snapshot_pause: histogram("snapshot_pause"), publish: histogram("publish"), fetch: histogram("fetch") };
    new Gauge({
      name: "cocoon_microvms",
      help: "MicroVMs by state",
      labelNames: ["state"],
      registers: [this.registry],
      async collect() {
        this.reset();
        for (const [state, count] of Object.entries(await sources.vmsByState())) this.set({ state }, count);
      },
    });
    new Gauge({
      name: "cocoon_host_capacity",
      help: "Host capacity for live microVMs, and what is in use (resource: vcpus|memory_mib; kind: capacity|used)",
      labelNames: ["resource", "kind"],
      registers: [this.registry],
      async collect() {
        const c = await sources.capacity();
        this.set({ resource: "vcpus", kind: "capacity" }, c.vcpus);
        this.set({ resource: "vcpus", kind: "used" }, c.usedVcpus);
        this.set({ resource: "memory_mib", kind: "capacity" }, c.memoryMiB);
        this.set({ resource: "memory_mib", kind: "used" }, c.usedMemoryMiB);
      },
    });
  }

  observe(op: TimedOperation, seconds: number): void {
    this.latency[op].observe(seconds);
  }
}
