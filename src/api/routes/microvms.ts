import { Type, type TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import type { FastifyReply } from "fastify";
import { TryPeersError } from "../../lifecycle/cluster.ts";
import type { NodeChannel } from "../../router/node-channel.ts";
import { pipeline, Transform, type Readable } from "node:stream";
import { ApiError } from "../../errors.ts";
import type { GuestService } from "../../lifecycle/guest.ts";
import { LIMITS, type MicroVmService } from "../../lifecycle/microvms.ts";
import { VOLUME_LIMITS } from "../../lifecycle/volumes.ts";
import { GRANT_LIMITS, grantAccessToken, grantShellToken } from "../../router/access-grants.ts";
import type { AccessTokens } from "../../router/access-tokens.ts";
import type { Db } from "../../store/db.ts";
import type { MicroVmRow } from "../../store/schema.ts";
import { listTags, TAG_LIMITS, tagResource, untagResource } from "../../store/tags.ts";
import { drained } from "../../util/streams.ts";
import { nonJson, ref, type MicroVmView } from "../schemas.ts";
import type { OutputBudget } from "../output-budget.ts";
import { errorBody, type Api } from "../fastify.ts";
import { imageView } from "./images.ts";

/** The largest upload (`PUT …/files`), streamed to the guest; JSON and text bodies keep the 1 MiB limit. */
export const UPLOAD_LIMIT_BYTES = 8 * 2 ** 30;

const int = (limits: { min: number; max: number }, description: string) =>
  Type.Integer({ minimum: limits.min, maximum: limits.max, description });

const CreateBody = Type.Object(
  {
    image: Type.String({ minLength: 1, maxLength: 128, description: "image name or id" }),
    imageVersion: Type.Optional(Type.Integer({ minimum: 1, description: "a version of the image (default: its latest READY, ACTIVE one)" })),
    vcpus: Type.Optional(int(LIMITS.vcpus, "vCPUs (default 1)")),
    memoryMiB: Type.Optional(int(LIMITS.memoryMiB, "memory in MiB (default 512)")),
    diskGiB: Type.Optional(int(LIMITS.diskGiB, "disk in GiB (default: the image's)")),
    env: Type.Optional(Type.Record(Type.String({ pattern: "^[A-Za-z_][A-Za-z0-9_]*$", maxLength: 256 }), Type.String({ maxLength: 32768 }), { maxProperties: 256 })),
    idlePolicy: Type.Optional(
      Type.Object(
        {
          suspendAfterSeconds: Type.Optional(int(LIMITS.suspendAfterSeconds, "suspend after this many idle seconds; 0 disables (default 900)")),
          autoResume: Type.Optional(Type.Boolean({ description: "resume on the next request or exec (default true)" })),
          terminateAfterSuspendedSeconds: Type.Optional(int(LIMITS.terminateAfterSuspendedSeconds, "terminate after this many seconds suspended; 0 never (default 0)")),
        },
        { additionalProperties: false },
      ),
    ),
    maxRuntimeSeconds: Type.Optional(int(LIMITS.maxRuntimeSeconds, "the VM ends this long after creation (default and ceiling 28800)")),
    onNodeFailure: Type.Optional(
      Type.Union([Type.Literal("fail"), Type.Literal("restore")], {
        description: 'cluster: when its node fails while it runs, "fail" (FAILED; the default) or "restore" (resumed elsewhere from its last published suspend, losing what it did since)',
      }),
    ),
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
          egressConnectors: Type.Optional(
            Type.Array(Type.String({ minLength: 1, maxLength: 64 }), { maxItems: 16, description: "named egress connectors (GET /v1/network-connectors); instead of egress" }),
          ),
        },
        { additionalProperties: false },
      ),
    ),
    endpoint: Type.Optional(Type.Object({ public: Type.Optional(Type.Boolean()) }, { additionalProperties: false })),
    appPort: Type.Optional(int(LIMITS.appPort, "guest port the endpoint forwards to (default: the image's EXPOSE)")),
    metadata: Type.Optional(Type.Record(Type.String({ maxLength: 128 }), Type.Unknown(), { maxProperties: 64 })),
    runHookPayload: Type.Optional(Type.String({ maxLength: 16 * 1024, description: "body of the image's /run hook (at most 16 KiB)" })),
    clientToken: Type.Optional(Type.String({ minLength: 1, maxLength: 64, description: "idempotency: a retry with the same token and request returns the same VM" })),
    volumes: Type.Optional(
      Type.Array(
        Type.Object(
          {
            name: Type.String({ minLength: 1, maxLength: 64, description: "volume name or id (POST /v1/volumes)" }),
            path: Type.String({ minLength: 1, maxLength: 256, description: "where the guest mounts it: an absolute path outside /proc, /sys, /dev, /run, /etc, /usr, /bin, /sbin, /lib, /lib64, /boot" }),
            readOnly: Type.Optional(Type.Boolean({ description: "default false; a volume has one read-write attachment at a time, or any number read-only" })),
          },
          { additionalProperties: false },
        ),
        { maxItems: VOLUME_LIMITS.perMicroVm, description: `persistent volumes to attach (at most ${VOLUME_LIMITS.perMicroVm})` },
      ),
    ),
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

const PortSpecBody = Type.Union([
  Type.Object({ port: int(LIMITS.appPort, "one guest port") }, { additionalProperties: false }),
  Type.Object({ range: Type.Object({ startPort: int(LIMITS.appPort, "first port"), endPort: int(LIMITS.appPort, "last port") }, { additionalProperties: false }) }, { additionalProperties: false }),
  Type.Object({ allPorts: Type.Literal(true) }, { additionalProperties: false }),
]);
const ExpiresInMinutes = Type.Integer({ minimum: GRANT_LIMITS.expiresInMinutes.min, maximum: GRANT_LIMITS.expiresInMinutes.max, description: "minutes until the token expires (1–60)" });
const TagsBody = Type.Record(Type.String({ minLength: 1, maxLength: TAG_LIMITS.keyLength }), Type.String({ maxLength: TAG_LIMITS.valueLength }), { maxProperties: 64 });

/** MicroVM lifecycle, exec, files, events, access tokens and tags (docs/api.md). */
export async function registerMicroVmRoutes(
  app: Api,
  deps: {
    microvms: MicroVmService;
    guest: GuestService;
    tokens: { access: AccessTokens; shell: AccessTokens };
    db: Db;
    endpointUrl: (id: string) => string;
    /** What buffered exec answers may hold in memory at once. */
    execOutputBudget: OutputBudget;
    /** Cluster: creates this node has no room for are offered to its peers over it. */
    nodeChannel?: NodeChannel;
  },
): Promise<void> {
  const { microvms, guest, tokens, db } = deps;
  const toView = (row: MicroVmRow) => microVmView(row, deps.endpointUrl(row.id));
  app.post("/v1/microvms", { config: { permission: "microvm:create" }, schema: { body: CreateBody, response: { 201: ref("MicroVm") } } }, async (req, reply) => {
    if (req.body.metadata) checkMetadata(req.body.metadata);
    try {
      const row = await microvms.create(req.tenantId, req.body);
      return reply.status(201).send(toView(row));
    } catch (err) {
      // Cluster: not here (no room, or the image is another node's): offered to the peers, once (never from a peer's offer).
      if (!(err instanceof TryPeersError) || !deps.nodeChannel || req.forwarded) throw err;
      const answer = await deps.nodeChannel.offerCreate(err.peers, req.tenantId, req.body);
      if (!answer) throw err;
      // Relayed as the peer answered it (the peer's own route checked its answer).
      return (reply as FastifyReply).status(answer.status).send(answer.body);
    }
  });

  app.get(
    "/v1/microvms",
    {
      config: { permission: "microvm:read" },
      schema: {
        querystring: Type.Object(
          {
            state: Type.Optional(Type.String({ maxLength: 32, description: "only VMs in this state (MicroVmState)" })),
            image: Type.Optional(Type.String({ maxLength: 128, description: "only VMs of this image (name or id)" })),
            limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100, description: "page size" })),
            nextToken: Type.Optional(Type.String({ maxLength: 256, description: "the nextToken of the previous page" })),
          },
          { additionalProperties: false },
        ),
        response: { 200: ref("MicroVmPage") },
      },
    },
    async (req) => {
      const page = await microvms.list(req.tenantId, { state: req.query.state, image: req.query.image, limit: req.query.limit ?? 100, nextToken: req.query.nextToken });
      return { microVms: page.items.map(toView), ...(page.nextToken ? { nextToken: page.nextToken } : {}) };
    },
  );

  app.get("/v1/microvms/:id", { config: { permission: "microvm:read" }, schema: { params: IdParams, response: { 200: ref("MicroVm") } } }, async (req) =>
    toView(await microvms.get(req.tenantId, req.params.id)),
  );
  app.post("/v1/microvms/:id/suspend", { config: { permission: "microvm:suspend" }, schema: { params: IdParams, response: { 200: ref("MicroVm") } } }, async (req) =>
    toView(await microvms.suspend(req.tenantId, req.params.id)),
  );
  app.post("/v1/microvms/:id/resume", { config: { permission: "microvm:resume" }, schema: { params: IdParams, response: { 200: ref("MicroVm") } } }, async (req) =>
    toView(await microvms.resume(req.tenantId, req.params.id)),
  );
  app.delete("/v1/microvms/:id", { config: { permission: "microvm:terminate" }, schema: { params: IdParams, response: { 200: ref("MicroVm") } } }, async (req) =>
    toView(await microvms.terminate(req.tenantId, req.params.id)),
  );
  // Named snapshots and forks of a running VM (docs/api.md): the VM runs on.
  app.post(
    "/v1/microvms/:id/snapshots",
    {
      config: { permission: "image:create" },
      schema: { params: IdParams, body: Type.Object({ name: Type.String({ minLength: 1, maxLength: 63, description: "the image's name (a new version if it exists)" }) }, { additionalProperties: false }), response: { 201: ref("Image") } },
    },
    async (req, reply) => reply.status(201).send(imageView(await microvms.snapshot(req.tenantId, req.params.id, req.body.name))),
  );
  app.post(
    "/v1/microvms/:id/fork",
    {
      config: { permission: "microvm:create" },
      schema: { params: IdParams, body: Type.Object({ count: Type.Optional(int(LIMITS.forkCount, "new VMs (default 1)")) }, { additionalProperties: false }), response: { 201: Type.Object({ microVms: Type.Array(ref("MicroVm"), { description: "the children, RUNNING" }) }) } },
    },
    async (req, reply) => reply.status(201).send({ microVms: (await microvms.fork(req.tenantId, req.params.id, req.body.count ?? 1)).map(toView) }),
  );
  app.get("/v1/microvms/:id/events", { config: { permission: "microvm:read" }, schema: { params: IdParams, response: { 200: ref("MicroVmEvents") } } }, async (req) => ({
    events: await microvms.events(req.tenantId, req.params.id),
  }));

  // Endpoint access for others: an X-aws-proxy-auth token for some ports, or one that opens GET /v1/microvms/{id}/shell.
  // Endpoint access for others: an X-aws-proxy-auth token for some ports, or one that opens GET /v1/microvms/{id}/shell.
  app.post(
    "/v1/microvms/:id/auth-tokens",
    { config: { permission: "microvm:read" }, schema: { params: IdParams, body: Type.Object({ ports: Type.Array(PortSpecBody, { minItems: 1, maxItems: GRANT_LIMITS.specs }), expiresInMinutes: ExpiresInMinutes }, { additionalProperties: false }), response: { 201: ref("AccessGrant") } } },
    async (req, reply) => {
      const grant = await grantAccessToken(tokens.access, microvms, req.tenantId, req.params.id, { ports: req.body.ports, expiresInMinutes: req.body.expiresInMinutes });
      return reply.status(201).send({ token: grant.token, header: "X-aws-proxy-auth", expiresAt: grant.expiresAt.toISOString() });
    },
  );
  app.post(
    "/v1/microvms/:id/shell-auth-tokens",
    { config: { permission: "microvm:exec" }, schema: { params: IdParams, body: Type.Object({ expiresInMinutes: ExpiresInMinutes }, { additionalProperties: false }), response: { 201: ref("AccessGrant") } } },
    async (req, reply) => {
      const grant = await grantShellToken(tokens.shell, microvms, req.tenantId, req.params.id, req.body.expiresInMinutes);
      return reply.status(201).send({ token: grant.token, header: "X-aws-proxy-auth", expiresAt: grant.expiresAt.toISOString(), url: `/v1/microvms/${req.params.id}/shell` });
    },
  );

  const vmTags = async (tenantId: string, id: string) => ({ type: "microvm" as const, id: (await microvms.get(tenantId, id)).id });
  app.get("/v1/microvms/:id/tags", { config: { permission: "microvm:read" }, schema: { params: IdParams, response: { 200: ref("TagSet") } } }, async (req) => ({
    tags: await listTags(db, req.tenantId, await vmTags(req.tenantId, req.params.id)),
  }));
  app.post("/v1/microvms/:id/tags", { config: { permission: "microvm:create" }, schema: { params: IdParams, body: Type.Object({ tags: TagsBody }, { additionalProperties: false }), response: { 200: ref("TagSet") } } }, async (req) => {
    const resource = await vmTags(req.tenantId, req.params.id);
    await tagResource(db, req.tenantId, resource, req.body.tags);
    return { tags: await listTags(db, req.tenantId, resource) };
  });
  app.delete(
    "/v1/microvms/:id/tags",
    { config: { permission: "microvm:create" }, schema: { params: IdParams, querystring: Type.Object({ keys: Type.Union([Type.String({ maxLength: 128 }), Type.Array(Type.String({ maxLength: 128 }), { maxItems: 64 })]) }, { additionalProperties: false }), response: { 200: ref("TagSet") } } },
    async (req) => {
      const resource = await vmTags(req.tenantId, req.params.id);
      await untagResource(db, req.tenantId, resource, [req.query.keys].flat());
      return { tags: await listTags(db, req.tenantId, resource) };
    },
  );

  app.post("/v1/microvms/:id/exec", { config: { permission: "microvm:exec" }, schema: {
        description: "Runs a command to completion (ExecResult); with Accept: application/x-ndjson, streams lines {stdout}, {stderr}, then {exitCode, durationMs, timedOut?} (an ErrorEnvelope line if the stream fails).",
        params: IdParams,
        body: ExecBody,
        response: { 200: ref("ExecResult") },
      },
    }, async (req, reply) => {
    const body = req.body;
    const abort = new AbortController();
    // The response closing before it finished means the client went away: kill the command.
    reply.raw.on("close", () => {
      if (!reply.raw.writableFinished) abort.abort();
    });
    const exec = { command: body.command, env: body.env, cwd: body.cwd, user: body.user, stdin: body.stdin, timeoutMs: Math.round((body.timeoutSeconds ?? 60) * 1000) };
    if (!String(req.headers.accept).includes("application/x-ndjson")) {
      // The output's charge is held until the answer is sent or the client is gone.
      const share = deps.execOutputBudget.hold();
      reply.raw.once("close", share.release);
      if (reply.raw.closed) share.release();
      const r = await guest.exec(req.tenantId, req.params.id, exec, { signal: abort.signal, keep: share.keep }).catch((err: unknown) => {
        share.release();
        throw err;
      });
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

  app.get("/v1/microvms/:id/files",
    {
      config: { permission: "microvm:exec" },
      schema: {
        description: "A directory's entries (FileListing), or a file's bytes as application/octet-stream.",
        params: IdParams,
        querystring: PathQuery,
        response: { 200: nonJson("a directory's entries, or a file's bytes", { "application/json": { schema: ref("FileListing") }, "application/octet-stream": { schema: { type: "string", format: "binary" } } }) },
      },
    },
    async (req, reply) => {
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
      { config: { permission: "microvm:exec" }, schema: { description: "Writes the body's bytes (at most 8 GiB) to the file, replacing it.", params: IdParams, querystring: PathQuery, response: { 200: ref("FileWritten") } } },
      async (req) => {
        if (Number(req.headers["content-length"] ?? 0) > UPLOAD_LIMIT_BYTES) throw tooLarge();
        const body = req.body as Readable | undefined;
        // pipeline, not pipe: a client that goes away mid-upload ends the upload to the guest too.
        const limited = body ? pipeline(body, limitBytes(UPLOAD_LIMIT_BYTES), () => undefined) : Buffer.alloc(0);
        return guest.write(req.tenantId, req.params.id, req.query.path, limited);
      },
    );
  });

  app.delete("/v1/microvms/:id/files", { config: { permission: "microvm:exec" }, schema: { params: IdParams, querystring: PathQuery, response: { 200: Type.Object({ path: Type.String(), removed: Type.Literal(true) }) } } }, async (req) => {
    await guest.remove(req.tenantId, req.params.id, req.query.path);
    return { path: req.query.path, removed: true as const };
  });
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

function microVmView(row: MicroVmRow, url: string): MicroVmView {
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
    ...(row.image_version !== null ? { imageVersion: row.image_version } : {}),
    idlePolicy: { suspendAfterSeconds: row.suspend_after_seconds, autoResume: row.auto_resume === 1, terminateAfterSuspendedSeconds: row.terminate_after_suspended_seconds },
    maxRuntimeSeconds: row.max_runtime_seconds,
    onNodeFailure: row.on_node_failure,
    network: { egress: JSON.parse(row.egress) as MicroVmView["network"]["egress"], ...(row.egress_connectors ? { egressConnectors: JSON.parse(row.egress_connectors) as string[] } : {}) },
    endpoint: { url, token: row.endpoint_token, public: row.endpoint_public === 1, ...(row.app_port ? { appPort: row.app_port } : {}) },
    metadata: JSON.parse(row.metadata) as Record<string, unknown>,
    ...(row.forked_from ? { forkedFrom: row.forked_from } : {}),
  };
}
