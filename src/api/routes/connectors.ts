import { Type } from "@fastify/type-provider-typebox";
import type { NetworkConnectors } from "../../lifecycle/connectors.ts";
import { ref } from "../schemas.ts";
import type { Api } from "../fastify.ts";

/**
 * Named egress connectors (admin): allow lists an operator defines once and
 * every tenant's VMs name in `network.egressConnectors` (AWS
 * `egressNetworkConnectors`). `INTERNET_EGRESS` is built in.
 */
export function registerConnectorRoutes(app: Api, connectors: NetworkConnectors): void {
  const admin = { permission: "admin:*" };
  app.post(
    "/v1/network-connectors",
    {
      config: admin,
      schema: {
        body: Type.Object(
          {
            name: Type.String({ minLength: 1, maxLength: 64 }),
            allow: Type.Array(Type.String({ minLength: 1, maxLength: 253 }), { minItems: 1, maxItems: 256, description: "IPv4 CIDRs, domain names, *.domain wildcards (as network.egress.allow)" }),
            description: Type.Optional(Type.String({ maxLength: 256 })),
          },
          { additionalProperties: false },
        ),
        response: { 201: ref("NetworkConnector") },
      },
    },
    async (req, reply) => reply.status(201).send(await connectors.create(req.body)),
  );
  app.get("/v1/network-connectors", { config: admin, schema: { response: { 200: Type.Object({ connectors: Type.Array(ref("NetworkConnector"), { description: "the built-in INTERNET_EGRESS first, then by name" }) }) } } }, async () => ({ connectors: await connectors.list() }));
  app.delete("/v1/network-connectors/:name", { config: admin, schema: { params: Type.Object({ name: Type.String({ maxLength: 64 }) }), response: { 200: Type.Object({ name: Type.String(), deleted: Type.Literal(true) }) } } }, async (req) => {
    await connectors.delete(req.params.name);
    return { name: req.params.name, deleted: true as const };
  });
}
