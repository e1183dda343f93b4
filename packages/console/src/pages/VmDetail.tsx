import { useEffect, useRef, useState } from "react";
import { api, stream, type Vm } from "../api.ts";
import { CopyButton, Sparkline, StateBadge, StateHistory, usePoll, when } from "../components/util.tsx";
import { Terminal } from "../components/Terminal.tsx";

const TABS = [
  ["overview", "Overview"],
  ["logs", "Logs"],
  ["terminal", "Terminal"],
] as const;

/** One microVM: actions, details, endpoint, metrics, events, logs and the terminal. */
export function VmDetail({ id, tab }: { id: string; tab: string }) {
  const { data: vm, error, refresh } = usePoll(() => api.getVm(id), 2000, [id]);
  const [busy, setBusy] = useState("");
  const [actionError, setActionError] = useState("");
  const [confirming, setConfirming] = useState(false);
  const [snapshotName, setSnapshotName] = useState("");
  const [notice, setNotice] = useState("");

  const act = async (name: string, fn: () => Promise<unknown>) => {
    setBusy(name);
    setActionError("");
    setNotice("");
    try {
      await fn();
    } catch (err) {
      setActionError((err as Error).message);
    } finally {
      setBusy("");
      setConfirming(false);
      refresh();
    }
  };
  if (error && !vm) {
    return (
      <section>
        <p className="error" role="alert">
          {error.message}
        </p>
        <a href="#/vms">Back to microVMs</a>
      </section>
    );
  }
  if (!vm) return <p aria-live="polite">Loading…</p>;
  const gone = vm.state === "TERMINATED" || vm.state === "FAILED";
  const endpointWithToken = vm.endpoint.token ? `${vm.endpoint.url}?cocoon_token=${encodeURIComponent(vm.endpoint.token)}` : vm.endpoint.url;

  return (
    <section aria-labelledby="vmTitle">
      <p>
        <a href="#/vms">← MicroVMs</a>
      </p>
      <div className="row spread">
        <h1 id="vmTitle">
          {vm.microVmId} <StateBadge state={vm.state} />
        </h1>
        <div className="row actions" role="group" aria-label="Lifecycle actions">
          <button type="button" disabled={!!busy || vm.state !== "RUNNING"} onClick={() => act("suspend", () => api.suspend(id))}>
            {busy === "suspend" ? "Suspending…" : "Suspend"}
          </button>
          <button type="button" disabled={!!busy || vm.state !== "SUSPENDED"} onClick={() => act("resume", () => api.resume(id))}>
            {busy === "resume" ? "Resuming…" : "Resume"}
          </button>
          <button
            type="button"
            disabled={!!busy || vm.state !== "RUNNING"}
            title="A new microVM with this one's memory, processes and disk of this instant; this one runs on"
            onClick={() =>
              act("fork", async () => {
                const [child] = (await api.fork(id, 1)).microVms;
                if (child) location.hash = `#/vms/${encodeURIComponent(child.microVmId)}`;
              })
            }
          >
            {busy === "fork" ? "Forking…" : "Fork"}
          </button>
          <form
            className="row"
            aria-label="Snapshot"
            onSubmit={(e) => {
              e.preventDefault();
              void act("snapshot", async () => {
                const image = await api.snapshot(id, snapshotName);
                setNotice(`Snapshot ${image.name} version ${String(image.version)} is ${image.state}: launch it as image ${image.name}.`);
              });
            }}
          >
            <input aria-label="Snapshot image name" placeholder="image name" value={snapshotName} onChange={(e) => setSnapshotName(e.target.value)} required />
            <button type="submit" disabled={!!busy || vm.state !== "RUNNING" || !snapshotName}>
              {busy === "snapshot" ? "Snapshotting…" : "Snapshot"}
            </button>
          </form>
          {!confirming ? (
            <button type="button" className="danger" disabled={!!busy || gone} onClick={() => setConfirming(true)}>
              Terminate
            </button>
          ) : (
            <span role="alertdialog" aria-labelledby="confirmText" className="confirm">
              <span id="confirmText">Terminate {vm.microVmId}? Its files are removed.</span>
              <button type="button" className="danger" autoFocus onClick={() => act("terminate", () => api.terminate(id))}>
                {busy === "terminate" ? "Terminating…" : "Yes, terminate"}
              </button>
              <button type="button" onClick={() => setConfirming(false)}>
                Cancel
              </button>
            </span>
          )}
        </div>
      </div>
      {vm.stateReason && <p className="hint">Reason: {vm.stateReason}</p>}
      {notice && (
        <p className="hint" role="status">
          {notice}
        </p>
      )}
      {actionError && (
        <p className="error" role="alert">
          {actionError}
        </p>
      )}
      <nav className="tabs" aria-label="MicroVM sections">
        {TABS.map(([t, label]) => (
          <a key={t} href={`#/vms/${encodeURIComponent(id)}${t === "overview" ? "" : `/${t}`}`} aria-current={tab === t ? "page" : undefined}>
            {label}
          </a>
        ))}
      </nav>
      {tab === "overview" && (
        <div className="overview">
          <div className="card">
            <h2>Details</h2>
            <dl className="props">
              <dt>Image</dt>
              <dd>
                {vm.image} <span className="hint">({vm.imageId})</span>
              </dd>
              {vm.forkedFrom && (
                <>
                  <dt>Forked from</dt>
                  <dd>
                    <a href={`#/vms/${encodeURIComponent(vm.forkedFrom)}`}>{vm.forkedFrom}</a>
                  </dd>
                </>
              )}
              <dt>Size</dt>
              <dd>
                {vm.vcpus} vCPU · {vm.memoryMiB} MiB · {vm.diskGiB} GiB
              </dd>
              <dt>Idle policy</dt>
              <dd>
                {vm.idlePolicy.suspendAfterSeconds ? `suspend after ${vm.idlePolicy.suspendAfterSeconds} s` : "never suspends"}
                {vm.idlePolicy.autoResume ? ", resumes on request" : ""}
              </dd>
              <dt>Egress</dt>
              <dd>{typeof vm.network.egress === "string" ? vm.network.egress : JSON.stringify(vm.network.egress)}</dd>
              <dt>Created</dt>
              <dd>{when(vm.createdAt)}</dd>
              <dt>Expires</dt>
              <dd>{when(vm.expiresAt)}</dd>
              <dt>Last activity</dt>
              <dd>{when(vm.lastActivityAt)}</dd>
              {vm.terminatedAt && (
                <>
                  <dt>Terminated</dt>
                  <dd>{when(vm.terminatedAt)}</dd>
                </>
              )}
              <dt>Endpoint</dt>
              <dd className="endpoint">
                <code>{endpointWithToken}</code> <CopyButton text={endpointWithToken} label="Copy endpoint URL with token" />
                {vm.endpoint.public && <span className="hint"> (public)</span>}
              </dd>
            </dl>
          </div>
          <Metrics id={id} live={vm.state === "RUNNING"} />
          <Events id={id} state={vm.state} />
        </div>
      )}
      {tab === "logs" && <Logs id={id} state={vm.state} />}
      {tab === "terminal" && (gone ? <p className="hint">This microVM has ended; no terminal.</p> : <Terminal id={id} />)}
    </section>
  );
}

function Metrics({ id, live }: { id: string; live: boolean }) {
  const { data, error } = usePoll(() => api.metrics(id), 2000, [id, live]);
  const samples = data?.samples ?? [];
  return (
    <div className="card">
      <h2>Metrics</h2>
      {error && <p className="error">{error.message}</p>}
      <div className="row charts">
        <Sparkline label="CPU" unit="%" max={100} values={samples.map((s) => s.cpuPercent ?? 0)} />
        <Sparkline label="Memory used" unit="MiB" values={samples.map((s) => s.memoryUsedMiB ?? 0)} />
      </div>
      <p className="hint">
        Now: CPU {fmt(data?.cpuPercent, "%")} · memory {fmt(data?.memoryUsedMiB, "MiB")} · disk {fmt(data?.diskUsedMiB, "MiB")}
        {live ? "" : " (not running: last samples)"}
      </p>
    </div>
  );
}

const fmt = (v: number | undefined, unit: string) => (v === undefined ? "—" : `${Math.round(v * 10) / 10} ${unit}`);

function Events({ id, state }: { id: string; state: string }) {
  const { data, error } = usePoll(() => api.events(id), 4000, [id, state]);
  return (
    <div className="card">
      <h2>Events</h2>
      {error && <p className="error">{error.message}</p>}
      <StateHistory events={data?.events ?? []} />
      <ol className="timeline" aria-label="Lifecycle events">
        {(data?.events ?? []).map((e, i) => (
          <li key={i}>
            <time dateTime={e.at}>{when(e.at)}</time> <span className="badge">{e.type}</span> {e.message}
          </li>
        ))}
      </ol>
    </div>
  );
}

/** GET …/logs?follow=true, streamed into a <pre> (the last 200 kB kept); reconnects when the VM's state changes. */
function Logs({ id, state }: { id: string; state: string }) {
  const [text, setText] = useState("");
  const [note, setNote] = useState("");
  const pre = useRef<HTMLPreElement>(null);
  const running = state === "RUNNING";
  useEffect(() => {
    const abort = new AbortController();
    setText("");
    setNote(running ? "following…" : "");
    stream(api.vmLogsPath(id), (chunk) => setText((t) => (t + chunk).slice(-200_000)), abort.signal)
      .then(() => !abort.signal.aborted && setNote(running ? "stream ended" : `${state.toLowerCase()}: not following`))
      .catch((err: Error) => !abort.signal.aborted && setNote(err.message));
    return () => abort.abort();
  }, [id, running, state]);
  useEffect(() => {
    const el = pre.current;
    if (el) el.scrollTop = el.scrollHeight;
  }, [text]);
  return (
    <div className="card">
      <h2>
        Logs{" "}
        <span className="hint" data-logs-status={note}>
          {note}
        </span>
      </h2>
      <pre ref={pre} className="logs" tabIndex={0} aria-label="Logs" aria-live="off">
        {text || (running ? "(no output yet: the console and the app's output appear here)" : "(no output)")}
      </pre>
    </div>
  );
}
