import { useState, type FormEvent } from "react";
import { api, ApiError } from "../api.ts";
import { StateBadge, usePoll, when } from "../components/util.tsx";

/** Persistent volumes: list (live) with who holds each, create (name, size), delete (refused while attached). */
export function VolumesPage() {
  const { data, error, refresh } = usePoll(() => api.listVolumes(), 3000, []);
  const [msg, setMsg] = useState("");
  const volumes = data?.volumes ?? [];
  const remove = async (name: string) => {
    setMsg("");
    try {
      await api.deleteVolume(name);
      refresh();
    } catch (err) {
      setMsg((err as Error).message);
    }
  };
  return (
    <section aria-labelledby="volumesTitle">
      <h1 id="volumesTitle">Volumes</h1>
      <div className="split">
        <div>
          {(error || msg) && (
            <p className="error" role="alert">
              {msg || error?.message}
            </p>
          )}
          <table className="list" aria-label="Volumes">
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Size</th>
                <th scope="col">State</th>
                <th scope="col">Attached to</th>
                <th scope="col">Created</th>
                <th scope="col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {volumes.map((v) => (
                <tr key={v.volumeId} data-volume={v.name}>
                  <td>
                    {v.name} <span className="hint">{v.volumeId}</span>
                  </td>
                  <td>{v.sizeGiB} GiB</td>
                  <td>
                    <StateBadge state={v.state} />
                  </td>
                  <td>
                    {v.attachedTo.map((a) => (
                      <div key={a.microVmId}>
                        <a href={`#/vms/${encodeURIComponent(a.microVmId)}`}>{a.microVmId}</a> at {a.path}
                        {a.readOnly ? " (read-only)" : ""}
                      </div>
                    ))}
                  </td>
                  <td>{when(v.createdAt)}</td>
                  <td>
                    <button type="button" className="danger" onClick={() => void remove(v.name)} aria-label={`Delete volume ${v.name}`}>
                      Delete
                    </button>
                  </td>
                </tr>
              ))}
              {data && volumes.length === 0 && (
                <tr>
                  <td colSpan={6} className="hint">
                    No volumes yet.
                  </td>
                </tr>
              )}
            </tbody>
          </table>
          <p className="hint">Attach a volume when creating a microVM; the guest mounts it. A volume has one read-write holder, or any number of read-only ones.</p>
        </div>
        <CreateVolume onCreated={refresh} />
      </div>
    </section>
  );
}

function CreateVolume({ onCreated }: { onCreated: () => void }) {
  const [name, setName] = useState("");
  const [size, setSize] = useState("1");
  const [error, setError] = useState<{ field?: string; message: string }>();
  const [busy, setBusy] = useState(false);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setError(undefined);
    setBusy(true);
    try {
      await api.createVolume({ name: name.trim(), sizeGiB: Number(size) });
      setName("");
      onCreated();
    } catch (err) {
      setError({ field: err instanceof ApiError ? err.field : undefined, message: (err as Error).message });
    } finally {
      setBusy(false);
    }
  };
  return (
    <form className="card form" onSubmit={submit} noValidate aria-labelledby="createVolumeTitle">
      <h2 id="createVolumeTitle">Create a volume</h2>
      <div className="field">
        <label htmlFor="v-name">Name</label>
        <input id="v-name" value={name} onChange={(e) => setName(e.target.value)} placeholder="data" aria-invalid={error?.field === "name" ? true : undefined} />
      </div>
      <div className="field">
        <label htmlFor="v-size">Size (GiB)</label>
        <input id="v-size" type="number" inputMode="numeric" value={size} onChange={(e) => setSize(e.target.value)} aria-invalid={error?.field?.includes("sizeGiB") ? true : undefined} />
        <span className="hint">1–32</span>
      </div>
      {error && (
        <p className="error" role="alert">
          {error.message}
        </p>
      )}
      <button type="submit" disabled={busy}>
        {busy ? "Creating…" : "Create"}
      </button>
    </form>
  );
}
