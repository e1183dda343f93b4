import { Type } from "@fastify/type-provider-typebox";
import type { GuestService } from "../../lifecycle/guest.ts";
import type { ServerMetrics } from "../../telemetry/metrics.ts";
import { nonJson, ref } from "../schemas.ts";
import type { Api } from "../fastify.ts";

const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 64 }) });

/** Logs, per-VM metrics and the Prometheus endpoint. None of them counts as VM activity. */
export function registerObserveRoutes(app: Api, deps: { guest: GuestService; metrics: ServerMetrics; metricsPublic: boolean }): void {
  const { guest } = deps;

  app.get("/v1/microvms/:id/metrics", { config: { permission: "microvm:read" }, schema: { params: IdParams, response: { 200: ref("VmMetrics") } } }, async (req) => guest.metrics(req.tenantId, req.params.id));

  app.get(
    "/v1/microvms/:id/logs",
    {
      config: { permission: "microvm:read" },
      schema: {
        description: "The VM's console and app output as text/plain; with follow=true it streams on.",
        params: IdParams,
        querystring: Type.Object({ follow: Type.Optional(Type.Boolean()) }),
        response: { 200: nonJson("the VM's log", { "text/plain": { schema: { type: "string" } } }) },
      },
    },
    async (req, reply) => {
      const logs = await guest.logs(req.tenantId, req.params.id, req.query.follow === true);
      // A follower that goes away ends the copy (and the agent's stream).
      reply.raw.once("close", () => logs.destroy());
      return reply.header("content-type", "text/plain; charset=utf-8").header("x-content-type-options", "nosniff").send(logs);
    },
  );

  app.get("/metrics", { config: deps.metricsPublic ? {} : { permission: "admin:*" }, schema: { hide: true } }, async (_req, reply) => {
    return reply.header("content-type", deps.metrics.registry.contentType).send(await deps.metrics.registry.metrics());
  });
}
