import { ApiError, InvalidArgumentError } from "../errors.ts";
import type { Db } from "../store/db.ts";
import { parseEgress, type Egress } from "../vmm/network/policy.ts";

/** The built-in connector: egress to public addresses (`network.egress: "internet"`). */
export const INTERNET_CONNECTOR = "INTERNET_EGRESS";
const NAME = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

export interface NetworkConnector {
  name: string;
  allow: string[];
  description?: string;
  createdAt: string;
}

/**
 * Named egress connectors: allow lists an operator defines once (admin) and
 * VMs of every tenant name (`network.egressConnectors`, AWS
 * `egressNetworkConnectors`). `INTERNET_EGRESS` is built in; no connector at
 * all is egress "none". A VM keeps the policy it was launched with: changing
 * or deleting a connector affects later launches only.
 */
export class NetworkConnectors {
  constructor(private readonly db: Db) {}

  async create(req: { name: string; allow: string[]; description?: string }): Promise<NetworkConnector> {
    if (!NAME.test(req.name)) throw new ApiError("ValidationError", `name must match ${NAME.source}, got "${req.name}"`, { field: "name" });
    if (req.name === INTERNET_CONNECTOR) throw new ApiError("ValidationError", `${INTERNET_CONNECTOR} is built in`, { field: "name" });
    try {
      parseEgress({ allow: req.allow });
    } catch (err) {
      if (err instanceof InvalidArgumentError) throw new ApiError("ValidationError", err.message.replace("network.egress.allow", "allow"), { field: "allow" });
      throw err;
    }
    if (await this.db.selectFrom("network_connectors").select("name").where("name", "=", req.name).executeTakeFirst()) {
      throw new ApiError("Conflict", `network connector ${req.name} already exists`, { field: "name" });
    }
    const row = { name: req.name, allow: JSON.stringify(req.allow), description: req.description ?? null, created_at: new Date().toISOString() };
    await this.db.insertInto("network_connectors").values(row).execute();
    return view(row);
  }

  async list(): Promise<NetworkConnector[]> {
    const rows = await this.db.selectFrom("network_connectors").selectAll().orderBy("name").execute();
    return [{ name: INTERNET_CONNECTOR, allow: [], description: "egress to public addresses (network.egress \"internet\")", createdAt: new Date(0).toISOString() }, ...rows.map(view)];
  }

  async delete(name: string): Promise<void> {
    const res = await this.db.deleteFrom("network_connectors").where("name", "=", name).executeTakeFirst();
    if (res.numDeletedRows === 0n) throw new ApiError("NotFound", `network connector ${name} not found`);
  }

  /**
   * The egress policy of a list of connector names: none → "none";
   * `INTERNET_EGRESS` (alone) → "internet"; named connectors → the union of
   * their allow lists. An unknown name is a 400 naming it.
   */
  async egressOf(names: string[], field = "egressConnectors"): Promise<Egress> {
    const unique = [...new Set(names)];
    if (!unique.length) return "none";
    if (unique.includes(INTERNET_CONNECTOR)) {
      if (unique.length > 1) throw new ApiError("ValidationError", `${field}: ${INTERNET_CONNECTOR} already allows every public address; name it alone`, { field });
      return "internet";
    }
    const rows = await this.db.selectFrom("network_connectors").selectAll().where("name", "in", unique).execute();
    const missing = unique.filter((n) => !rows.some((r) => r.name === n));
    if (missing.length) throw new ApiError("ValidationError", `${field}: unknown network connector ${missing.join(", ")}`, { field });
    return parseEgress({ allow: [...new Set(rows.flatMap((r) => JSON.parse(r.allow) as string[]))] });
  }
}

function view(row: { name: string; allow: string; description: string | null; created_at: string }): NetworkConnector {
  return { name: row.name, allow: JSON.parse(row.allow) as string[], ...(row.description ? { description: row.description } : {}), createdAt: row.created_at };
}
