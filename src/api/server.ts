import Fastify, { type FastifyInstance } from "fastify";
import type { Accelerator } from "../vmm/qemu.ts";

export const VERSION = "0.1.0";

/** The HTTP API (API.md). For now: health, which also reports the accelerator in use. */
export function buildApi(opts: { accelerator: Accelerator; logger?: boolean }): FastifyInstance {
  const app = Fastify({ logger: opts.logger ?? false });
  app.get("/v1/health", async () => ({ status: "ok", accelerator: opts.accelerator, version: VERSION }));
  return app;
}
