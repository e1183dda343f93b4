import { Type } from "@fastify/type-provider-typebox";
import { ApiError } from "../../errors.ts";
import { listNodes, setNodeDraining } from "../../lifecycle/cluster.ts";
import type { Db } from "../../store/db.ts";
import type { NodeRow } from "../../store/schema.ts";
import type { Api } from "../fastify.ts";

const NodeParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 63, description: "node id (COCOON_NODE_ID)" }) });

const nodeView = (n: NodeRow & { lease_live?: boolean }) => ({
  nodeId: n.id,
  url: n.url,
  state: n.state,
  stateReason: n.state_reason,
  epoch: n.epoch,
  leaseLive: n.lease_live,
  leaseExpiresAt: new Date(n.lease_expires_at).toISOString(),
  qemuBuild: n.qemu_build,
  accelerator: n.accelerator,
  capacity: { vcpus: n.vcpus, memoryMiB: n.memory_mib },
});

/** Cluster nodes (docs/cluster.md; admin only): list them, drain one (no new VMs) and make it active again. */
export function registerClusterRoutes(app: Api, db: Db): void {
  const admin = { permission: "admin:*" };
  app.get("/v1/cluster/nodes", { config: admin }, async () => ({ nodes: (await listNodes(db)).map(nodeView) }));
  for (const [action, draining] of [["drain", true], ["activate", false]] as const) {
    app.post(`/v1/cluster/nodes/:id/${action}`, { config: admin, schema: { params: NodeParams } }, async (req) => {
      const node = await setNodeDraining(db, req.params.id, draining);
      if (!node) throw new ApiError("NotFound", `no live node ${req.params.id}`, { field: "id" });
      return nodeView(node);
    });
  }
}
