import { Type, type TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import { pipeline, Transform, type Readable } from "node:stream";
import { ApiError } from "../../errors.ts";
import type { GuestService } from "../../lifecycle/guest.ts";
import { LIMITS, type MicroVmService } from "../../lifecycle/microvms.ts";
import type { AccessTokens, PortSelection } from "../../router/access-tokens.ts";
import type { MicroVmRow } from "../../store/schema.ts";
import { drained } from "../../util/streams.ts";
import { errorBody, type Api } from "../server.ts";

/** The largest upload (`PUT …/files`), streamed to the guest; JSON and text bodies keep the 1 MiB limit. */
export const UPLOAD_LIMIT_BYTES = 8 * 2 ** 30;

const int = (limits: { min: number; max: number }, description: string) =>
  Type.Integer({ minimum: limits.min, maximum: limits.max, description });

const CreateBody = Type.Object(
  {
    image: Type.String({ minLength: 1, maxLength: 128, description: "image name or id" }),
    vcpus: Type.Optional(int(LIMITS.vcpus, "vCPUs (default 1)")),
    memoryMiB: Type.Optional(int(LIMITS.memoryMiB, "memory in MiB (default 512)")),
    diskGiB: Type.Optional(int(LIMITS.diskGiB, "disk in GiB (default: the image's)")),
    env: Type.Optional(Type.Record(Type.String({ pattern: "^[A-Za-z_][A-Za-z0-9_]*$", maxLength: 256 }), Type.String({ maxLength: 32768 }), { maxProperties: 256 })),
    idlePolicy: Type.Optional(
      Type.Object(
        {
          suspendAfterSeconds: Type.Optional(int(LIMITS.suspendAfterSeconds, "suspend after this many idle seconds; 0 disables (default 900)")),
          autoResume: Type.Optional(Type.Boolean({ description: "resume on the next request or exec (default true)" })),
        },
        { additionalProperties: false },
      ),
    ),
    maxRuntimeSeconds: Type.Optional(int(LIMITS.maxRuntimeSeconds, "the VM ends this long after creation (default and ceiling 28800)")),
    network: Type.Optional(
      Type.Object(
        {
          egress: Type.Optional(
            Type.Union([
              Type.Literal("none"),
              Type.Literal("internet"),
              Type.Object({ allow: Type.Array(Type.String({ minLength: 1, maxLength: 253 }), { maxItems: 256 }) }, { additionalProperties: false }),
            ]),
          ),
        },
        { additionalProperties: false },
      ),
    ),
    endpoint: Type.Optional(Type.Object({ public: Type.Optional(Type.Boolean()) }, { additionalProperties: false })),
    appPort: Type.Optional(int(LIMITS.appPort, "guest port the endpoint forwards to (default: the image's EXPOSE)")),
    metadata: Type.Optional(Type.Record(Type.String({ maxLength: 128 }), Type.Unknown(), { maxProperties: 64 })),
  },
  { additionalProperties: false },
);

const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 64 }) });

const ExecBody = Type.Object(
  {
    command: Type.Union([Type.String({ minLength: 1, maxLength: 65536 }), Type.Array(Type.String({ maxLength: 65536 }), { minItems: 1, maxItems: 4096 })]),
    env: Type.Optional(Type.Record(Type.String({ maxLength: 256 }), Type.String({ maxLength: 32768 }), { maxProperties: 256 })),
    cwd: Type.Optional(Type.String({ minLength: 1, maxLength: 4096 })),
    user: Type.Optional(Type.String({ minLength: 1, maxLength: 64 })),
    stdin: Type.Optional(Type.String({ maxLength: 512 * 1024 })),
    timeoutSeconds: Type.Optional(Type.Number({ exclusiveMinimum: 0, maximum: 28800, description: "default 60" })),
  },
  { additionalProperties: false },
);

const PathQuery = Type.Object({ path: Type.String({ minLength: 1, maxLength: 4096, pattern: "^/" }) });

const Port = Type.Integer({ minimum: 1, maximum: 65_535 });
const AuthTokenBody = Type.Object(
  {
    ports: Type.Union([Type.Literal("all"), Type.Array(Port, { minItems: 1, maxItems: 256 }), Type.Object({ from: Port, to: Port }, { additionalProperties: false })], {
      description: '"all", a list of ports, or {from, to} (inclusive)',
    }),
    expiresInSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: 3600, default: 900, description: "lifetime, default 900" })),
  },
  { additionalProperties: false },
);

/** MicroVM lifecycle, exec, files, events and endpoint access tokens (API.md). */
export async function registerMicroVmRoutes(
  app: Api,
  deps: { microvms: MicroVmService; guest: GuestService; accessTokens: AccessTokens; endpointUrl: (id: string) => string },
): Promise<void> {
  const { microvms, guest } = deps;
  const toView = (row: MicroVmRow) => microVmView(row, deps.endpointUrl(row.id));
  app.post("/v1/microvms", { config: { permission: "microvm:create" }, schema: { body: CreateBody } }, async (req, reply) => {
    if (req.body.metadata) checkMetadata(req.body.metadata);
    const row = await microvms.create(req.tenantId, req.body);
    return reply.status(201).send(toView(row));
  });

  app.get(
    "/v1/microvms",
    {
      config: { permission: "microvm:read" },
      schema: {
        querystring: Type.Object(
          {
            state: Type.Optional(Type.String({ maxLength: 32 })),
            image: Type.Optional(Type.String({ maxLength: 128 })),
            limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100 })),
            nextToken: Type.Optional(Type.String({ maxLength: 256 })),
          },
          { additionalProperties: false },
        ),
      },
    },
    async (req) => {
      const page = await microvms.list(req.tenantId, { state: req.query.state, image: req.query.image, limit: req.query.limit ?? 100, nextToken: req.query.nextToken });
      return { microVms: page.items.map(toView), ...(page.nextToken ? { nextToken: page.nextToken } : {}) };
    },
  );

  app.get("/v1/microvms/:id", { config: { permission: "microvm:read" }, schema: { params: IdParams } }, async (req) =>
    toView(await microvms.get(req.tenantId, req.params.id)),
  );
  app.post("/v1/microvms/:id/suspend", { config: { permission: "microvm:suspend" }, schema: { params: IdParams } }, async (req) =>
    toView(await microvms.suspend(req.tenantId, req.params.id)),
  );
  app.post("/v1/microvms/:id/resume", { config: { permission: "microvm:resume" }, schema: { params: IdParams } }, async (req) =>
    toView(await microvms.resume(req.tenantId, req.params.id)),
  );
  app.delete("/v1/microvms/:id", { config: { permission: "microvm:terminate" }, schema: { params: IdParams } }, async (req) =>
    toView(await microvms.terminate(req.tenantId, req.params.id)),
  );
  app.get("/v1/microvms/:id/events", { config: { permission: "microvm:read" }, schema: { params: IdParams } }, async (req) => ({
    events: await microvms.events(req.tenantId, req.params.id),
  }));

  app.post("/v1/microvms/:id/exec", { config: { permission: "microvm:exec" }, schema: { params: IdParams, body: ExecBody } }, async (req, reply) => {
    const body = req.body;
    const abort = new AbortController();
    // The response closing before it finished means the client went away: kill the command.
    reply.raw.on("close", () => {
      if (!reply.raw.writableFinished) abort.abort();
    });
    const exec = { command: body.command, env: body.env, cwd: body.cwd, user: body.user, stdin: body.stdin, timeoutMs: Math.round((body.timeoutSeconds ?? 60) * 1000) };
    if (!String(req.headers.accept).includes("application/x-ndjson")) {
      const r = await guest.exec(req.tenantId, req.params.id, exec, abort.signal);
      const truncated = Object.fromEntries(Object.entries(r.truncated).filter(([, cut]) => cut));
      return {
        exitCode: r.exitCode,
        stdout: r.stdout,
        stderr: r.stderr,
        durationMs: r.durationMs,
        ...(r.timedOut ? { timedOut: true } : {}),
        ...(Object.keys(truncated).length ? { truncated } : {}),
      };
    }
    // Streamed: the command is started before committing to a 200, so a missing command is still a 400;
    // each line waits for the client to take the last (back-pressure up to the guest's pipe).
    const events = guest.execStream(req.tenantId, req.params.id, exec, abort.signal);
    const first = await events.next();
    reply.hijack();
    const out = reply.raw;
    out.writeHead(200, { "content-type": "application/x-ndjson", "x-request-id": req.id });
    try {
      for (let ev = first; !ev.done && !out.destroyed; ev = await events.next()) {
        const e = ev.value;
        let line: string | undefined;
        if (e.type === "stdout" || e.type === "stderr") line = JSON.stringify({ [e.type]: e.data.toString() });
        else if (e.type === "exit") line = JSON.stringify({ exitCode: e.exitCode, durationMs: e.durationMs, ...(e.timedOut ? { timedOut: true } : {}) });
        if (line !== undefined && !out.write(`${line}\n`)) await drained(out);
      }
    } catch (err) {
      // Headers are sent: the stream ends with the error as its last line.
      if (!out.destroyed) out.write(`${JSON.stringify(errorBody("BadGateway", `the command's output stream failed: ${(err as Error).message}`))}\n`);
    } finally {
      await events.return(undefined);
      out.end();
    }
  });

  app.get("/v1/microvms/:id/files", { config: { permission: "microvm:exec" }, schema: { params: IdParams, querystring: PathQuery } }, async (req, reply) => {
    const found = await guest.read(req.tenantId, req.params.id, req.query.path);
    if ("entries" in found) return { path: req.query.path, entries: found.entries };
    return reply.header("content-type", "application/octet-stream").header("content-length", found.sizeBytes).send(found.file);
  });

  // Uploads stream to the guest, in a scope whose only parser hands over the raw
  // body: no string parser ever holds one, and the limit is counted on the stream.
  await app.register(async (scope) => {
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser("*", (_request, payload, done) => done(null, payload));
    scope.withTypeProvider<TypeBoxTypeProvider>().put(
      "/v1/microvms/:id/files",
      { config: { permission: "microvm:exec" }, schema: { params: IdParams, querystring: PathQuery } },
      async (req) => {
        if (Number(req.headers["content-length"] ?? 0) > UPLOAD_LIMIT_BYTES) throw tooLarge();
        const body = req.body as Readable | undefined;
        // pipeline, not pipe: a client that goes away mid-upload ends the upload to the guest too.
        const limited = body ? pipeline(body, limitBytes(UPLOAD_LIMIT_BYTES), () => undefined) : Buffer.alloc(0);
        return guest.write(req.tenantId, req.params.id, req.query.path, limited);
      },
    );
  });

  app.delete("/v1/microvms/:id/files", { config: { permission: "microvm:exec" }, schema: { params: IdParams, querystring: PathQuery } }, async (req) => {
    await guest.remove(req.tenantId, req.params.id, req.query.path);
    return { path: req.query.path, removed: true };
  });

  app.post(
    "/v1/microvms/:id/auth-tokens",
    {
      config: { permission: "microvm:exec" },
      schema: {
        params: IdParams,
        body: AuthTokenBody,
        description: "An access token for the VM's endpoints on the ports named, until it expires: send it as X-aws-proxy-auth (or Authorization: Bearer).",
      },
    },
    async (req, reply) => {
      const row = await microvms.get(req.tenantId, req.params.id);
      if (row.state === "TERMINATED") throw new ApiError("InvalidState", `microVM ${row.id} is TERMINATED`, { state: row.state });
      const { ports } = req.body;
      let selection: PortSelection;
      if (ports === "all") selection = { all: true };
      else if (Array.isArray(ports)) selection = { ports };
      else {
        if (ports.from > ports.to) throw new ApiError("ValidationError", `body.ports.from (${ports.from}) must not exceed body.ports.to (${ports.to})`, { field: "body.ports.from" });
        selection = { from: ports.from, to: ports.to };
      }
      // Whole seconds: the token carries its expiry in seconds.
      const expiresAt = new Date((Math.floor(Date.now() / 1000) + (req.body.expiresInSeconds ?? 900)) * 1000);
      const token = deps.accessTokens.issue({ microVmId: row.id, ports: selection, expiresAt });
      return reply.status(201).send({ token, expiresAt: expiresAt.toISOString(), microVmId: row.id, ports });
    },
  );
}

/** metadata is kept and answered as JSON: bounded so that it always is (JSON.stringify recurses). */
const METADATA_LIMITS = { bytes: 64 * 1024, depth: 32 };

function checkMetadata(metadata: Record<string, unknown>): void {
  const tooDeep = () => new ApiError("ValidationError", `body.metadata must not nest deeper than ${METADATA_LIMITS.depth} levels`, { field: "body.metadata" });
  const pending: [unknown, number][] = [[metadata, 1]];
  while (pending.length) {
    const [value, depth] = pending.pop()!;
    if (typeof value !== "object" || value === null) continue;
    if (depth > METADATA_LIMITS.depth) throw tooDeep();
    for (const child of Object.values(value)) pending.push([child, depth + 1]);
  }
  if (Buffer.byteLength(JSON.stringify(metadata)) > METADATA_LIMITS.bytes) {
    throw new ApiError("ValidationError", `body.metadata must not exceed ${METADATA_LIMITS.bytes} bytes as JSON`, { field: "body.metadata" });
  }
}

const tooLarge = () => new ApiError("PayloadTooLarge", `the upload exceeds ${UPLOAD_LIMIT_BYTES} bytes`, { limitBytes: UPLOAD_LIMIT_BYTES });

/** Passes `maxBytes` through, then fails the stream with PayloadTooLarge. */
function limitBytes(maxBytes: number): Transform {
  let seen = 0;
  return new Transform({
    transform(chunk: Buffer, _encoding, done) {
      seen += chunk.length;
      done(seen > maxBytes ? tooLarge() : null, chunk);
    },
  });
}

function microVmView(row: MicroVmRow, url: string) {
  return {
    microVmId: row.id,
    image: row.image_name,
    imageId: row.image_id,
    state: row.state,
    ...(row.state_reason ? { stateReason: row.state_reason } : {}),
    vcpus: row.vcpus,
    memoryMiB: row.memory_mib,
    diskGiB: row.disk_gib,
    createdAt: row.created_at,
    expiresAt: row.expires_at,
    lastActivityAt: row.last_activity_at,
    ...(row.terminated_at ? { terminatedAt: row.terminated_at } : {}),
    idlePolicy: { suspendAfterSeconds: row.suspend_after_seconds, autoResume: row.auto_resume === 1 },
    maxRuntimeSeconds: row.max_runtime_seconds,
    network: { egress: JSON.parse(row.egress) as unknown },
    endpoint: { url, token: row.endpoint_token, public: row.endpoint_public === 1, ...(row.app_port ? { appPort: row.app_port } : {}) },
    metadata: JSON.parse(row.metadata) as Record<string, unknown>,
  };
}
