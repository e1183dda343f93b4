import { useState } from "react";
import { api, VM_STATES } from "../api.ts";
import { StateBadge, usePoll, when } from "../components/util.tsx";

/** The tenant's microVMs with live state (polled every 2 s), a state filter and a search box. */
export function VmList() {
  const [state, setState] = useState("");
  const [search, setSearch] = useState("");
  const { data, error } = usePoll(() => api.listVms(state || undefined), 2000, [state]);
  const q = search.trim().toLowerCase();
  const vms = (data?.microVms ?? []).filter(
    (vm) => !q || vm.microVmId.toLowerCase().includes(q) || vm.image.toLowerCase().includes(q) || JSON.stringify(vm.metadata).toLowerCase().includes(q),
  );
  return (
    <section aria-labelledby="vmsTitle">
      <div className="row spread">
        <h1 id="vmsTitle">MicroVMs</h1>
        <a className="button" href="#/vms/new">
          Create microVM
        </a>
      </div>
      <div className="row filters">
        <label>
          State{" "}
          <select value={state} onChange={(e) => setState(e.target.value)} aria-label="Filter by state">
            <option value="">All states</option>
            {VM_STATES.map((s) => (
              <option key={s} value={s}>
                {s}
              </option>
            ))}
          </select>
        </label>
        <label>
          Search{" "}
          <input type="search" value={search} onChange={(e) => setSearch(e.target.value)} placeholder="id, image or metadata" aria-label="Search microVMs" />
        </label>
        <span className="hint" aria-live="polite">
          {data ? `${vms.length} shown` : "loading…"}
        </span>
      </div>
      {error && (
        <p className="error" role="alert">
          {error.message}
        </p>
      )}
      <table className="list" aria-label="MicroVMs">
        <thead>
          <tr>
            <th scope="col">ID</th>
            <th scope="col">State</th>
            <th scope="col">Image</th>
            <th scope="col">vCPUs</th>
            <th scope="col">Memory</th>
            <th scope="col">Created</th>
            <th scope="col">Last activity</th>
          </tr>
        </thead>
        <tbody>
          {vms.map((vm) => (
            <tr key={vm.microVmId} data-vm-id={vm.microVmId}>
              <td>
                <a href={`#/vms/${encodeURIComponent(vm.microVmId)}`}>{vm.microVmId}</a>
              </td>
              <td>
                <StateBadge state={vm.state} />
              </td>
              <td>{vm.image}</td>
              <td>{vm.vcpus}</td>
              <td>{vm.memoryMiB} MiB</td>
              <td>{when(vm.createdAt)}</td>
              <td>{when(vm.lastActivityAt)}</td>
            </tr>
          ))}
          {data && vms.length === 0 && (
            <tr>
              <td colSpan={7} className="hint">
                No microVMs{state || q ? " match" : " yet"}.
              </td>
            </tr>
          )}
        </tbody>
      </table>
    </section>
  );
}
