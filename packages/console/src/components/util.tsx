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

/** The state an event leaves a VM in (lifecycle event types of the API). */
function stateAfter(e: { type: string; message: string }): string | undefined {
  switch (e.type) {
    case "created":
    case "resumed":
    case "suspend-failed":
      return "RUNNING";
    case "suspended":
    case "resume-failed":
      return "SUSPENDED";
    case "terminated":
      return "TERMINATED";
    case "failed":
      return "FAILED";
    case "reconciled":
      return /→ (\w+)/.exec(e.message)?.[1];
    default:
      return undefined;
  }
}

const STATE_COLOURS: Record<string, string> = { RUNNING: "#32d583", SUSPENDED: "#fdb022", TERMINATED: "#98a2b3", FAILED: "#f04438" };

/** The VM's states over time, from its events, as one horizontal bar (a small SVG chart). */
export function StateHistory({ events, now = Date.now() }: { events: { type: string; message: string; at: string }[]; now?: number }) {
  const changes = events.flatMap((e) => {
    const state = stateAfter(e);
    return state ? [{ state, at: Date.parse(e.at) }] : [];
  });
  if (changes.length === 0) return null;
  const start = changes[0]!.at;
  const end = changes.at(-1)!.state === "TERMINATED" ? changes.at(-1)!.at : Math.max(now, changes.at(-1)!.at);
  const span = Math.max(end - start, 1);
  const w = 480;
  const h = 18;
  const segments = changes.map((c, i) => ({ ...c, until: changes[i + 1]?.at ?? end }));
  const seen = [...new Set(segments.map((s) => s.state))];
  return (
    <figure className="chart">
      <figcaption>State history</figcaption>
      <svg width="100%" height={h} viewBox={`0 0 ${w} ${h}`} preserveAspectRatio="none" role="img" aria-label={`State history: ${segments.map((s) => s.state.toLowerCase()).join(", then ")}`}>
        <rect x="0" y="0" width={w} height={h} className="chart-bg" />
        {segments.map((s, i) => (
          <rect key={i} x={((s.at - start) / span) * w} y="0" width={Math.max(((s.until - s.at) / span) * w, 1)} height={h} fill={STATE_COLOURS[s.state] ?? "#84adff"}>
            <title>{`${s.state} from ${new Date(s.at).toLocaleTimeString()}`}</title>
          </rect>
        ))}
      </svg>
      <p className="legend">
        {seen.map((state) => (
          <span key={state} className="legend-item">
            <span className="legend-swatch" style={{ background: STATE_COLOURS[state] ?? "#84adff" }} aria-hidden="true" /> {state.toLowerCase()}
          </span>
        ))}
      </p>
    </figure>
  );
}
