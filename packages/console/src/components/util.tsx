import { useEffect, useRef, useState } from "react";

/** Calls `fn` now and every `ms` while mounted (and while `enabled`); the latest result or error. */
export function usePoll<T>(fn: () => Promise<T>, ms: number, deps: unknown[], enabled = true): { data?: T; error?: Error; refresh: () => void } {
  const [data, setData] = useState<T>();
  const [error, setError] = useState<Error>();
  const [tick, setTick] = useState(0);
  const fnRef = useRef(fn);
  fnRef.current = fn;
  useEffect(() => {
    if (!enabled) return;
    let alive = true;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const run = async () => {
      try {
        const value = await fnRef.current();
        if (alive) {
          setData(value);
          setError(undefined);
        }
      } catch (err) {
        if (alive) setError(err as Error);
      }
      if (alive) timer = setTimeout(run, ms);
    };
    void run();
    return () => {
      alive = false;
      clearTimeout(timer);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [...deps, tick, enabled, ms]);
  return { data, error, refresh: () => setTick((t) => t + 1) };
}

export function StateBadge({ state }: { state: string }) {
  return <span className={`badge state-${state.toLowerCase()}`}>{state}</span>;
}

export function when(iso?: string): string {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function CopyButton({ text, label }: { text: string; label: string }) {
  const [done, setDone] = useState(false);
  return (
    <button
      type="button"
      className="small"
      aria-label={label}
      onClick={async () => {
        try {
          await navigator.clipboard.writeText(text);
        } catch {
          // Insecure origins have no clipboard API: fall back to a hidden textarea.
          const area = document.createElement("textarea");
          area.value = text;
          document.body.append(area);
          area.select();
          document.execCommand("copy");
          area.remove();
        }
        setDone(true);
        setTimeout(() => setDone(false), 1500);
      }}
    >
      {done ? "Copied" : "Copy"}
    </button>
  );
}

/** A small inline SVG line chart of `values` (no axes; min and max in the label). */
export function Sparkline({ values, label, unit, max }: { values: number[]; label: string; unit: string; max?: number }) {
  const w = 240;
  const h = 48;
  const top = Math.max(max ?? 0, ...values, 1);
  const points = values.map((v, i) => `${values.length === 1 ? w : (i / (values.length - 1)) * w},${h - (v / top) * (h - 2) - 1}`).join(" ");
  const last = values.at(-1);
  return (
    <figure className="chart">
      <figcaption>
        {label}: <strong>{last === undefined ? "—" : `${Math.round(last * 10) / 10} ${unit}`}</strong>
      </figcaption>
      <svg width={w} height={h} viewBox={`0 0 ${w} ${h}`} role="img" aria-label={`${label} over the last ${values.length} samples`}>
        <rect x="0" y="0" width={w} height={h} className="chart-bg" />
        {values.length > 0 && <polyline points={points} fill="none" className="chart-line" strokeWidth="1.5" />}
      </svg>
    </figure>
  );
}
