import fastifyStatic from "@fastify/static";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { endpointHostPattern } from "../../router/endpoint.ts";
import { REPO_ROOT } from "../../util/repo-root.ts";
import { errorBody, type Api } from "../fastify.ts";

/** The web console's build output (packages/console, built by scripts/setup.sh). */
export const CONSOLE_DIST = join(REPO_ROOT, "packages/console/dist");

/**
 * Serves the web console under /console/ (static files only; it talks to the
 * public /v1 API). Not on endpoint hosts (`{id}.{domain}`, `{port}-{id}.{domain}`):
 * those paths belong to the VM's app.
 */
export async function registerConsoleRoutes(app: Api, domain: string, dir = CONSOLE_DIST): Promise<void> {
  const vmHost = endpointHostPattern(domain);
  const notVmHost = new RegExp(`^(?!${vmHost.source.slice(1)})`, "i");
  const constraints = { host: notVmHost };
  app.get("/console", { constraints, schema: { hide: true } }, async (_req, reply) => reply.redirect("/console/"));
  if (!existsSync(`${dir}/index.html`)) {
    app.get("/console/*", { constraints, schema: { hide: true } }, async (_req, reply) =>
      reply.status(404).send(errorBody("NotFound", "the console is not built: run `npm run build -w packages/console` (scripts/setup.sh does)")),
    );
    return;
  }
  await app.register(fastifyStatic, {
    root: dir,
    prefix: "/console/",
    constraints,
    decorateReply: false,
    // Hashed asset names can be cached for good; index.html is checked every time.
    setHeaders: (reply, path) => void reply.header("cache-control", path.endsWith(".html") ? "no-cache" : "public, max-age=31536000, immutable"),
  });
}
