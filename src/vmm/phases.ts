/** One engine operation whose phases are timed (`Engine` emits `phases` when it ends). */
export type TimedOperation = "launch" | "resume" | "warm" | "prestart" | "capture" | "fork-child" | "fork";

/**
 * Wall time of the phases of one operation, in order: each `mark` ends the
 * phase under way. A phase marked twice adds up. The bench and the metrics
 * read these to say where a launch or a resume spends its time.
 */
export class PhaseClock {
  private last = performance.now();
  private readonly started = this.last;
  readonly phases: Record<string, number> = {};

  mark(phase: string): void {
    const now = performance.now();
    this.phases[phase] = (this.phases[phase] ?? 0) + (now - this.last);
    this.last = now;
  }

  get totalMs(): number {
    return this.last - this.started;
  }
}
