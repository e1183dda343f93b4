/**
 * What one owner (a VM, one of its QEMU processes, a template) holds on the
 * host, as the steps that give it back, newest first: whatever acquires a
 * resource pushes its release at once, so a failure part-way through setting
 * something up is undone by the same `release` as a normal end (the shape of
 * E2B's orchestrator `sandbox/cleanup.go`).
 */
export class ReleaseStack {
  private readonly steps: { what: string; release: () => Promise<unknown> }[] = [];

  /** Registers the release of something just acquired. */
  push(what: string, release: () => Promise<unknown>): void {
    this.steps.push({ what, release });
  }

  /** Acquires a resource and registers its release in one step (nothing is pushed if acquiring fails). */
  async acquire<T>(what: string, acquire: () => Promise<T> | T, release: (value: T) => Promise<unknown>): Promise<T> {
    const value = await acquire();
    this.push(what, () => release(value));
    return value;
  }

  get size(): number {
    return this.steps.length;
  }

  /**
   * Runs every release step, newest first, each once. A failing step does not
   * stop the others; the failures are thrown together at the end.
   */
  async release(): Promise<void> {
    const failures: string[] = [];
    for (let step = this.steps.pop(); step; step = this.steps.pop()) {
      try {
        await step.release();
      } catch (err) {
        failures.push(`${step.what}: ${(err as Error).message}`);
      }
    }
    if (failures.length) throw new Error(`releasing host resources failed: ${failures.join("; ")}`);
  }
}
