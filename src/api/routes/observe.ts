import { Type } from "@fastify/type-provider-typebox";
import { createReadStream } from "node:fs";
import { PassThrough } from "node:stream";
import type { MicroVmService } from "../../lifecycle/microvms.ts";
import type { ServerMetrics } from "../../telemetry/metrics.ts";
import type { VmSampler } from "../../telemetry/vm-samples.ts";
import { machinePaths } from "../../vmm/qemu.ts";
import type { Api } from "../server.ts";

const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 64 }) });

/** Logs, per-VM metrics and the Prometheus endpoint. None of them counts as VM activity. */
export function registerObserveRoutes(app: Api, deps: { microvms: MicroVmService; sampler: VmSampler; metrics: ServerMetrics; metricsPublic: boolean }): void {
  const { microvms, sampler } = deps;

  app.get("/v1/microvms/:id/metrics", { config: { permission: "microvm:read" }, schema: { params: IdParams } }, async (req) => {
    const { row, vm } = await microvms.peek(req.tenantId, req.params.id);
    return row.state === "RUNNING" && vm ? sampler.sample(vm.id, vm.agent) : sampler.recent(row.id);
  });

  app.get(
    "/v1/microvms/:id/logs",
    { config: { permission: "microvm:read" }, schema: { params: IdParams, querystring: Type.Object({ follow: Type.Optional(Type.Boolean()) }) } },
    async (req, reply) => {
      const { row, vm } = await microvms.peek(req.tenantId, req.params.id);
      const out = new PassThrough();
      void reply.header("content-type", "text/plain; charset=utf-8").send(out);
      // The VM's console (kernel and agent boot messages) first, then the app's output.
      if (vm) {
        await new Promise<void>((resolve) => {
          const console = createReadStream(machinePaths(vm.dir).console);
          console.on("error", () => resolve()).on("end", resolve).pipe(out, { end: false });
        });
      }
      if (row.state === "RUNNING" && vm) {
        try {
          const app = await vm.agent.logs(req.query.follow === true);
          reply.raw.on("close", () => app.destroy());
          app.pipe(out);
          return reply;
        } catch {
          // the agent may be restarting; the console part stands alone
        }
      }
      out.end();
      return reply;
    },
  );

  app.get("/metrics", { config: deps.metricsPublic ? {} : { permission: "admin:*" }, schema: { hide: true } }, async (_req, reply) => {
    return reply.header("content-type", deps.metrics.registry.contentType).send(await deps.metrics.registry.metrics());
  });
}
