import { Type } from "@fastify/type-provider-typebox";
import { open } from "node:fs/promises";
import type { IncomingMessage } from "node:http";
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
      const follow = req.query.follow === true;
      const out = new PassThrough();
      void reply.header("content-type", "text/plain; charset=utf-8").send(out);
      if (!vm) return void out.end();
      // The VM's console (what the guest prints to its serial port) first, then the app's output.
      const consolePath = machinePaths(vm.dir).console;
      let offset = await copyFileTail(consolePath, 0, out);
      if (!follow) {
        const app = row.state === "RUNNING" ? await vm.agent.logs(false).catch(() => undefined) : undefined; // the agent may be restarting
        if (app) app.pipe(out);
        else out.end();
        return reply;
      }
      // Following: the console file polled for what is appended, and the app's
      // output as it comes (its stream may not start until the app prints).
      let app: IncomingMessage | undefined;
      if (row.state === "RUNNING") {
        void vm.agent.logs(true).then(
          (stream) => {
            app = stream;
            if (out.writableEnded) stream.destroy();
            else stream.pipe(out, { end: false });
          },
          () => undefined,
        );
      }
      let polling = false;
      const timer = setInterval(() => {
        if (polling) return;
        polling = true;
        void copyFileTail(consolePath, offset, out).then((next) => {
          offset = next;
          polling = false;
        });
      }, 500);
      reply.raw.on("close", () => {
        clearInterval(timer);
        app?.destroy();
        out.end();
      });
      return reply;
    },
  );

  app.get("/metrics", { config: deps.metricsPublic ? {} : { permission: "admin:*" }, schema: { hide: true } }, async (_req, reply) => {
    return reply.header("content-type", deps.metrics.registry.contentType).send(await deps.metrics.registry.metrics());
  });
}

/** Writes what `path` holds from `offset` to its current end into `out`; returns the new end (unchanged if the file is gone). */
async function copyFileTail(path: string, offset: number, out: PassThrough): Promise<number> {
  const fh = await open(path, "r").catch(() => undefined);
  if (!fh) return offset;
  try {
    const { size } = await fh.stat();
    let at = size < offset ? 0 : offset; // truncated: start again
    const buf = Buffer.alloc(1 << 16);
    for (let n = 1; n > 0 && at < size; at += n) {
      n = (await fh.read(buf, 0, Math.min(buf.length, size - at), at)).bytesRead;
      out.write(Buffer.from(buf.subarray(0, n)));
    }
    return at;
  } finally {
    await fh.close();
  }
}
