import { useState, type FormEvent, type ReactNode } from "react";
import { api, ApiError } from "../api.ts";
import { usePoll } from "../components/util.tsx";

interface Form {
  image: string;
  vcpus: string;
  memoryMiB: string;
  diskGiB: string;
  suspendAfterSeconds: string;
  autoResume: boolean;
  maxRuntimeSeconds: string;
  egress: "none" | "internet" | "allow";
  allow: string;
  env: string;
  volumes: string;
}

const initial: Form = { image: "base", vcpus: "1", memoryMiB: "512", diskGiB: "", suspendAfterSeconds: "900", autoResume: true, maxRuntimeSeconds: "28800", egress: "none", allow: "", env: "", volumes: "" };

/** Which form field an API field path (`body.memoryMiB`, `body.idlePolicy.suspendAfterSeconds`, `memoryMiB`) belongs to. */
function fieldOf(path: string | undefined, message: string): keyof Form | undefined {
  const text = `${path ?? ""} ${message}`;
  const names: [RegExp, keyof Form][] = [
    [/suspendAfterSeconds|idlePolicy/, "suspendAfterSeconds"],
    [/maxRuntimeSeconds/, "maxRuntimeSeconds"],
    [/memoryMiB/, "memoryMiB"],
    [/diskGiB/, "diskGiB"],
    [/vcpus/, "vcpus"],
    [/egress|network/, "egress"],
    [/\benv\b|body\.env/, "env"],
    [/volume/, "volumes"],
    [/image/, "image"],
  ];
  return names.find(([re]) => re.test(text))?.[1];
}

/** Numbers are sent as typed (a non-number is sent as text, so the API's own validation message shows). */
function num(v: string): number | string | undefined {
  if (!v.trim()) return undefined;
  const n = Number(v);
  return Number.isFinite(n) ? n : v;
}

export function VmCreate({ image }: { image?: string }) {
  const [form, setForm] = useState<Form>({ ...initial, image: image ?? initial.image });
  const [errors, setErrors] = useState<Partial<Record<keyof Form, string>>>({});
  const [general, setGeneral] = useState("");
  const [busy, setBusy] = useState(false);
  const images = usePoll(() => api.listImages(), 10_000, []);
  const set = <K extends keyof Form>(k: K, v: Form[K]) => setForm((f) => ({ ...f, [k]: v }));

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setErrors({});
    setGeneral("");
    const env: Record<string, string> = {};
    for (const line of form.env.split("\n")) {
      if (!line.trim()) continue;
      const eq = line.indexOf("=");
      if (eq <= 0) {
        setErrors({ env: `"${line}" is not NAME=value` });
        return;
      }
      env[line.slice(0, eq).trim()] = line.slice(eq + 1);
    }
    const volumes = [];
    for (const line of form.volumes.split("\n")) {
      if (!line.trim()) continue;
      const [name, path, mode, ...rest] = line.trim().split(":");
      if (!name || !path || rest.length > 0 || (mode !== undefined && mode !== "ro")) {
        setErrors({ volumes: `"${line}" is not name:/path or name:/path:ro` });
        return;
      }
      volumes.push({ name, path, ...(mode === "ro" ? { readOnly: true } : {}) });
    }
    const body = {
      image: form.image.trim(),
      vcpus: num(form.vcpus),
      memoryMiB: num(form.memoryMiB),
      diskGiB: num(form.diskGiB),
      ...(Object.keys(env).length ? { env } : {}),
      ...(volumes.length ? { volumes } : {}),
      idlePolicy: { suspendAfterSeconds: num(form.suspendAfterSeconds), autoResume: form.autoResume },
      maxRuntimeSeconds: num(form.maxRuntimeSeconds),
      network: { egress: form.egress === "allow" ? { allow: form.allow.split(/[\s,]+/).filter(Boolean) } : form.egress },
    };
    setBusy(true);
    try {
      const vm = await api.createVm(body);
      location.hash = `#/vms/${encodeURIComponent(vm.microVmId)}`;
    } catch (err) {
      const field = err instanceof ApiError ? fieldOf(err.field, err.message) : undefined;
      if (field && err instanceof ApiError && err.code === "ValidationError") setErrors({ [field]: err.message });
      else setGeneral((err as Error).message);
    } finally {
      setBusy(false);
    }
  };

  const field = (k: keyof Form, label: string, input: ReactNode, hint?: string) => (
    <div className="field">
      <label htmlFor={`f-${k}`}>{label}</label>
      {input}
      {hint && <span className="hint">{hint}</span>}
      {errors[k] && (
        <span id={`f-${k}-error`} className="error" role="alert">
          {errors[k]}
        </span>
      )}
    </div>
  );
  const text = (k: "image" | "vcpus" | "memoryMiB" | "diskGiB" | "suspendAfterSeconds" | "maxRuntimeSeconds", type = "number") => (
    <input
      id={`f-${k}`}
      name={k}
      type={type}
      inputMode={type === "number" ? "numeric" : undefined}
      value={form[k]}
      onChange={(e) => set(k, e.target.value)}
      aria-invalid={errors[k] ? true : undefined}
      aria-describedby={errors[k] ? `f-${k}-error` : undefined}
    />
  );

  return (
    <section aria-labelledby="createTitle">
      <h1 id="createTitle">Create a microVM</h1>
      <form className="card form" onSubmit={submit} noValidate>
        {field(
          "image",
          "Image",
          <>
            <input
              id="f-image"
              name="image"
              list="imageNames"
              value={form.image}
              onChange={(e) => set("image", e.target.value)}
              aria-invalid={errors.image ? true : undefined}
              aria-describedby={errors.image ? "f-image-error" : undefined}
            />
            <datalist id="imageNames">
              <option value="base" />
              {(images.data?.images ?? [])
                .filter((i) => i.state === "READY")
                .map((i) => (
                  <option key={i.imageId} value={i.name} />
                ))}
            </datalist>
          </>,
          "base, or the name of a READY image",
        )}
        <div className="grid3">
          {field("vcpus", "vCPUs", text("vcpus"))}
          {field("memoryMiB", "Memory (MiB)", text("memoryMiB"))}
          {field("diskGiB", "Disk (GiB)", text("diskGiB"), "empty: the image's")}
        </div>
        <div className="grid3">
          {field("suspendAfterSeconds", "Suspend after idle (s)", text("suspendAfterSeconds"), "0 never suspends")}
          <div className="field checkbox">
            <input id="f-autoResume" type="checkbox" checked={form.autoResume} onChange={(e) => set("autoResume", e.target.checked)} />
            <label htmlFor="f-autoResume">Resume automatically on request</label>
          </div>
          {field("maxRuntimeSeconds", "Max runtime (s)", text("maxRuntimeSeconds"))}
        </div>
        {field(
          "egress",
          "Network egress",
          <select id="f-egress" value={form.egress} onChange={(e) => set("egress", e.target.value as Form["egress"])} aria-describedby={errors.egress ? "f-egress-error" : undefined}>
            <option value="none">none</option>
            <option value="internet">internet</option>
            <option value="allow">allow list</option>
          </select>,
        )}
        {form.egress === "allow" && (
          <div className="field">
            <label htmlFor="f-allow">Allowed hosts and networks</label>
            <input id="f-allow" value={form.allow} onChange={(e) => set("allow", e.target.value)} placeholder="pypi.org, *.debian.org, 10.1.2.0/24" />
          </div>
        )}
        {field(
          "env",
          "Environment (NAME=value per line)",
          <textarea id="f-env" rows={3} value={form.env} onChange={(e) => set("env", e.target.value)} aria-describedby={errors.env ? "f-env-error" : undefined} />,
        )}
        {field(
          "volumes",
          "Volumes (name:/path, or name:/path:ro, per line)",
          <textarea id="f-volumes" rows={2} value={form.volumes} onChange={(e) => set("volumes", e.target.value)} aria-describedby={errors.volumes ? "f-volumes-error" : undefined} />,
          "persistent volumes (see Volumes) the guest mounts at each path",
        )}
        {general && (
          <p className="error" role="alert">
            {general}
          </p>
        )}
        <div className="row">
          <button type="submit" disabled={busy}>
            {busy ? "Creating… (waits until RUNNING)" : "Create"}
          </button>
          <a href="#/vms">Cancel</a>
        </div>
      </form>
    </section>
  );
}
