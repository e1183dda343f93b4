import { useEffect, useRef, useState, type FormEvent } from "react";
import { api, ApiError, stream } from "../api.ts";
import { StateBadge, usePoll, when } from "../components/util.tsx";

// A starting point: the zip's files served by Python (the build VM has internet egress for apt-get).
const SAMPLE = `FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
EXPOSE 8080
CMD ["python3", "-m", "http.server", "8080"]
`;

/** Images: list (live), create from Dockerfile text + zip, build log streaming, describe, delete. */
export function ImagesPage({ selected }: { selected?: string }) {
  const { data, error, refresh } = usePoll(() => api.listImages(), 3000, []);
  const [search, setSearch] = useState("");
  const q = search.trim().toLowerCase();
  const images = (data?.images ?? []).filter((i) => !q || i.name.toLowerCase().includes(q) || i.imageId.toLowerCase().includes(q));
  return (
    <section aria-labelledby="imagesTitle">
      <h1 id="imagesTitle">Images</h1>
      <div className="split">
        <div>
          <div className="row filters">
            <label>
              Search <input type="search" value={search} onChange={(e) => setSearch(e.target.value)} aria-label="Search images" />
            </label>
          </div>
          {error && (
            <p className="error" role="alert">
              {error.message}
            </p>
          )}
          <table className="list" aria-label="Images">
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">State</th>
                <th scope="col">Created</th>
                <th scope="col">Size</th>
              </tr>
            </thead>
            <tbody>
              {images.map((i) => (
                <tr key={i.imageId}>
                  <td>
                    <a href={`#/images/${encodeURIComponent(i.imageId)}`}>{i.name}</a> <span className="hint">{i.imageId}</span>
                  </td>
                  <td>
                    <StateBadge state={i.state} />
                  </td>
                  <td>{when(i.createdAt)}</td>
                  <td>{i.sizeBytes ? `${(i.sizeBytes / 2 ** 20).toFixed(1)} MiB` : "—"}</td>
                </tr>
              ))}
              {data && images.length === 0 && (
                <tr>
                  <td colSpan={4} className="hint">
                    No images{q ? " match" : " yet (the built-in base is always available)"}.
                  </td>
                </tr>
              )}
            </tbody>
          </table>
          {selected ? <ImageDetail id={selected} onDeleted={refresh} /> : null}
        </div>
        <CreateImage onCreated={refresh} />
      </div>
    </section>
  );
}

function ImageDetail({ id, onDeleted }: { id: string; onDeleted: () => void }) {
  const { data: image, error } = usePoll(() => api.getImage(id), 3000, [id]);
  const [log, setLog] = useState("");
  const [force, setForce] = useState(false);
  const [confirming, setConfirming] = useState(false);
  const [msg, setMsg] = useState("");
  const pre = useRef<HTMLPreElement>(null);
  useEffect(() => {
    const abort = new AbortController();
    setLog("");
    stream(api.buildLogPath(id), (t) => setLog((l) => (l + t).slice(-300_000)), abort.signal).catch((err: Error) => !abort.signal.aborted && setLog((l) => `${l}\n[${err.message}]`));
    return () => abort.abort();
  }, [id]);
  useEffect(() => {
    if (pre.current) pre.current.scrollTop = pre.current.scrollHeight;
  }, [log]);
  if (error && !image) return <p className="error">{error.message}</p>;
  if (!image) return <p>Loading…</p>;
  const remove = async () => {
    setConfirming(false);
    try {
      await api.deleteImage(image.imageId, force);
      onDeleted();
      location.hash = "#/images";
    } catch (err) {
      setMsg((err as Error).message);
    }
  };
  return (
    <div className="card" aria-labelledby="imageTitle">
      <h2 id="imageTitle">
        {image.name} <StateBadge state={image.state} />
      </h2>
      <dl className="props">
        {Object.entries(image).map(([k, v]) => (
          <div key={k} className="prop">
            <dt>{k}</dt>
            <dd>{typeof v === "object" ? JSON.stringify(v) : String(v)}</dd>
          </div>
        ))}
      </dl>
      <div className="row">
        {image.state === "READY" && (
          <a className="button" href={`#/vms/new/${encodeURIComponent(image.name)}`}>
            Launch a microVM
          </a>
        )}
        {!confirming ? (
          <button type="button" className="danger" onClick={() => setConfirming(true)}>
            Delete image
          </button>
        ) : (
          <span role="alertdialog" aria-labelledby="confirmImage" className="confirm">
            <span id="confirmImage">
              Delete {image.name} ({image.imageId})?
            </span>
            <button type="button" className="danger" autoFocus onClick={remove}>
              Yes, delete
            </button>
            <button type="button" onClick={() => setConfirming(false)}>
              Cancel
            </button>
          </span>
        )}
        <label className="checkbox">
          <input type="checkbox" checked={force} onChange={(e) => setForce(e.target.checked)} /> force (even while microVMs use it)
        </label>
      </div>
      {msg && (
        <p className="error" role="alert">
          {msg}
        </p>
      )}
      <h3>Build log</h3>
      <pre ref={pre} className="logs" tabIndex={0} aria-label="Build log">
        {log}
      </pre>
    </div>
  );
}

function CreateImage({ onCreated }: { onCreated: () => void }) {
  const [name, setName] = useState("");
  const [dockerfile, setDockerfile] = useState(SAMPLE);
  const [file, setFile] = useState<File>();
  const [error, setError] = useState<{ field?: string; message: string }>();
  const [busy, setBusy] = useState(false);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setError(undefined);
    const form = new FormData();
    form.set("name", name.trim());
    form.set("dockerfile", dockerfile);
    if (file) form.set("code", file, file.name);
    setBusy(true);
    try {
      const image = await api.createImage(form);
      onCreated();
      location.hash = `#/images/${encodeURIComponent(image.imageId)}`;
    } catch (err) {
      setError({ field: err instanceof ApiError ? err.field : undefined, message: (err as Error).message });
    } finally {
      setBusy(false);
    }
  };
  const errFor = (f: string) =>
    error && (error.field === f || (!error.field && f === "general")) ? (
      <span className="error" role="alert">
        {error.message}
      </span>
    ) : null;
  const other = error && error.field && !["name", "dockerfile", "code"].includes(error.field);
  return (
    <form className="card form" onSubmit={submit} aria-labelledby="newImageTitle">
      <h2 id="newImageTitle">New image</h2>
      <div className="field">
        <label htmlFor="img-name">Name</label>
        <input id="img-name" value={name} onChange={(e) => setName(e.target.value)} required />
        {errFor("name")}
      </div>
      <div className="field">
        <label htmlFor="img-dockerfile">Dockerfile</label>
        <textarea id="img-dockerfile" className="code" rows={10} spellCheck={false} value={dockerfile} onChange={(e) => setDockerfile(e.target.value)} />
        {errFor("dockerfile")}
      </div>
      <div className="field">
        <label htmlFor="img-code">Code (.zip)</label>
        <input id="img-code" type="file" accept=".zip,application/zip" onChange={(e) => setFile(e.target.files?.[0])} />
        {errFor("code")}
      </div>
      {errFor("general")}
      {other && (
        <span className="error" role="alert">
          {error.message}
        </span>
      )}
      <button type="submit" disabled={busy || !name.trim()}>
        {busy ? "Uploading…" : "Build image"}
      </button>
    </form>
  );
}
