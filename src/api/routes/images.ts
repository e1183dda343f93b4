import multipart from "@fastify/multipart";
import { Type, type Static, type TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import { Ajv } from "ajv";
import { rm } from "node:fs/promises";
import { ApiError } from "../../errors.ts";
import { stageStream, type StagedCode } from "../../images/intake.ts";
import { HOOK_LIMITS, HOOK_NAMES, type ImageHooks } from "../../images/hooks.ts";
import { managedImage, managedImages, managedImageView } from "../../images/managed.ts";
import { IMAGE_VERSION_STATUSES, type ImageService, type ImageVersionStatus } from "../../images/service.ts";
import type { MicroVmService } from "../../lifecycle/microvms.ts";
import type { Db } from "../../store/db.ts";
import type { ImageRow } from "../../store/schema.ts";
import { listTags, TAG_LIMITS, tagResource, untagResource } from "../../store/tags.ts";
import { findLiveKey } from "../../store/tenants.ts";
import { grants } from "../auth.ts";
import { nonJson, ref, type ImageView } from "../schemas.ts";
import type { Api } from "../fastify.ts";
import { registerRegistryRoutes } from "./registries.ts";

const BuildArgs = Type.Record(Type.String({ pattern: "^[A-Za-z_][A-Za-z0-9_]*$", maxLength: 256 }), Type.String({ maxLength: 32768 }), { maxProperties: 128 });
const CreateFields = {
  name: Type.String({ minLength: 1, maxLength: 63, description: "image name; builds of one name are versions 1, 2, …" }),
  dockerfile: Type.Optional(Type.String({ minLength: 1, maxLength: 1024 * 1024, description: "Dockerfile text (default: Dockerfile at the archive root)" })),
  buildArgs: Type.Optional(BuildArgs),
  target: Type.Optional(Type.String({ minLength: 1, maxLength: 63, description: "the Dockerfile stage to build (FROM … AS name); default the last" })),
  vcpus: Type.Optional(Type.Integer({ minimum: 1, maximum: 16, description: "vCPUs of the build and of every VM of the image (default 1)" })),
  memoryMiB: Type.Optional(Type.Integer({ minimum: 128, maximum: 32768, description: "memory of the build and of every VM of the image (default 512)" })),
};
const TagsBody = Type.Record(Type.String({ minLength: 1, maxLength: TAG_LIMITS.keyLength }), Type.String({ maxLength: TAG_LIMITS.valueLength }), { maxProperties: 64 });
const HookNames = Type.Union(HOOK_NAMES.map((n) => Type.Literal(n)));
/** Fields of a JSON create beyond the multipart ones (lifecycle hooks, runtime env, managed base, idempotency). */
const JsonOnlyFields = {
  baseImage: Type.Optional(Type.String({ minLength: 1, maxLength: 63, description: "a managed image to build on: FROM it when the Dockerfile has none" })),
  env: Type.Optional(Type.Record(Type.String({ pattern: "^[A-Za-z_][A-Za-z0-9_]*$", maxLength: 256 }), Type.String({ maxLength: 32768 }), { maxProperties: 256, description: "runtime env of the app and execs, over the Dockerfile's ENV" })),
  hooks: Type.Optional(
    Type.Object(
      {
        port: Type.Integer({ minimum: 1, maximum: 65535, description: "guest port of the hook listener" }),
        enabled: Type.Optional(Type.Array(HookNames, { maxItems: HOOK_NAMES.length, description: "hooks to call (default all: ready, validate, run, suspend, resume, terminate)" })),
        // Partial: a record over a union of names would require a timeout for every hook.
        timeoutSeconds: Type.Optional(Type.Partial(Type.Record(HookNames, Type.Integer({ minimum: HOOK_LIMITS.timeoutSeconds.min, maximum: HOOK_LIMITS.timeoutSeconds.max })))),
      },
      { additionalProperties: false },
    ),
  ),
  description: Type.Optional(Type.String({ maxLength: 1024 })),
  egressConnectors: Type.Optional(Type.Array(Type.String({ minLength: 1, maxLength: 64 }), { maxItems: 16, description: "default egress connectors of the image's VMs" })),
  tags: Type.Optional(TagsBody),
  clientToken: Type.Optional(Type.String({ minLength: 1, maxLength: 64, description: "idempotency: a retry with the same token and request returns the same version" })),
};
const CreateJson = Type.Object(
  { ...CreateFields, ...JsonOnlyFields, codeUri: Type.String({ minLength: 1, maxLength: 4096, description: "s3://bucket/key, https://… or file://… (admin)" }) },
  { additionalProperties: false },
);
const CreateMultipart = Type.Object(CreateFields, { additionalProperties: false });

const ajv = new Ajv({ coerceTypes: false, allErrors: false });
const checkJson = ajv.compile<Static<typeof CreateJson>>(CreateJson);
const checkMultipart = ajv.compile<Static<typeof CreateMultipart>>(CreateMultipart);

const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 128 }) });

/**
 * MicroVM Images (docs/api.md): create from multipart (`name`, `dockerfile`, `code`
 * zip) or JSON with `codeUri`; list, describe, build log, delete.
 * Registered in its own scope so that @fastify/multipart parses only here.
 */
export async function registerImageRoutes(root: Api, images: ImageService, microvms: MicroVmService, db: Db): Promise<void> {
  const connectors = microvms.connectors;
  await root.register(async (scope) => {
    const app = scope.withTypeProvider<TypeBoxTypeProvider>();
    const limits = images.archiveLimits;
    await scope.register(multipart, {
      limits: { fileSize: limits.maxCompressedBytes, files: 2, fields: 16, fieldSize: 1024 * 1024, parts: 20 },
    });

    app.post(
      "/v1/images",
      {
        config: { permission: "image:create" },
        bodyLimit: 1024 * 1024,
        schema: {
          description:
            "Build an image: multipart/form-data with `name`, `dockerfile` (text or file), `code` (.zip) and optionally `buildArgs` (JSON), `target`, `vcpus`, `memoryMiB`; or JSON " +
            "`{name, codeUri, dockerfile?, buildArgs?, target?, vcpus?, memoryMiB?, baseImage?, env?, hooks?, description?, egressConnectors?, tags?, clientToken?}`. Answers 202 with the image PENDING or BUILDING.",
          // The JSON form, documented (and checked by Fastify for application/json); a multipart body is read and
          // checked part by part below, and a body of any other type by checkJson.
          body: { content: { "application/json": { schema: CreateJson } } },
          response: { 202: ref("Image") },
        },
      },
      async (req, reply) => {
        let staged: StagedCode | undefined;
        try {
          let fields: Static<typeof CreateMultipart>;
          if (req.isMultipart()) {
            const raw: Record<string, unknown> = {};
            for await (const part of req.parts()) {
              if (part.type === "file") {
                if (part.fieldname === "code") {
                  if (staged) throw new ApiError("ValidationError", "only one code file", { field: "code" });
                  staged = await stageStream(part.file, images.stagingDir, limits.maxCompressedBytes);
                } else if (part.fieldname === "dockerfile") {
                  raw.dockerfile = (await part.toBuffer()).toString("utf8");
                } else {
                  part.file.resume();
                  throw new ApiError("ValidationError", `unexpected file field ${part.fieldname} (expected code, dockerfile)`, { field: part.fieldname });
                }
              } else {
                const value = String(part.value);
                if (part.fieldname === "buildArgs") raw.buildArgs = parseJsonField("buildArgs", value);
                else if (part.fieldname === "vcpus" || part.fieldname === "memoryMiB") raw[part.fieldname] = Number(value);
                else raw[part.fieldname] = value;
              }
            }
            if (!checkMultipart(raw)) throw schemaError(checkMultipart.errors);
            if (!staged) throw new ApiError("ValidationError", "the code field (a .zip file) is required", { field: "code" });
            fields = raw;
          } else {
            const body = req.body as unknown;
            if (!checkJson(body)) throw schemaError(checkJson.errors);
            const admin = await isAdmin(db, req.headers.authorization);
            const { codeUri, clientToken, ...rest } = body;
            const prepare = async () => ({ ...rest, code: await images.fetchCode(req.tenantId, codeUri, { admin }) });
            // Unknown connector names are refused before anything is fetched.
            if (rest.egressConnectors) await connectors.egressOf(rest.egressConnectors, "egressConnectors");
            if (clientToken !== undefined) {
              return reply.status(202).send(imageView(await images.createOnce(req.tenantId, { operation: "create-image", clientToken }, { codeUri, ...rest }, prepare)));
            }
            const prepared = await prepare();
            staged = prepared.code;
            return reply.status(202).send(imageView(await images.create(req.tenantId, prepared)));
          }
          const row = await images.create(req.tenantId, { ...fields, code: staged });
          return reply.status(202).send(imageView(row));
        } finally {
          // create() consumes the staged file; this covers a failure before it.
          if (staged) await rm(staged.path, { force: true });
        }
      },
    );

    app.get(
      "/v1/images",
      { config: { permission: "image:read" }, schema: { querystring: Type.Object({ name: Type.Optional(Type.String({ maxLength: 63 })) }, { additionalProperties: false }), response: { 200: ref("ImageList") } } },
      // The managed images first (always READY), then the tenant's own.
      async (req) => ({
        images: [
          ...managedImages().filter((m) => req.query.name === undefined || m.name === req.query.name),
          ...(await images.list(req.tenantId, { name: req.query.name })).map(imageView),
        ],
      }),
    );

    app.get("/v1/images/:id", { config: { permission: "image:read" }, schema: { params: IdParams, response: { 200: ref("Image") } } }, async (req) => {
      const managed = managedImage(req.params.id);
      return managed ? managedImageView(managed) : imageView(await images.get(req.tenantId, req.params.id));
    });

    app.get(
      "/v1/images/:id/build-log",
      {
        config: { permission: "image:read" },
        schema: {
          description: "The build's log as text/plain; with follow=true it streams until the build ends.",
          params: IdParams,
          querystring: Type.Object({ follow: Type.Optional(Type.Boolean({ default: false })) }, { additionalProperties: false }),
          response: { 200: nonJson("the build log", { "text/plain": { schema: { type: "string" } } }) },
        },
      },
      async (req, reply) => {
        const stream = await images.buildLog(req.tenantId, req.params.id, req.query.follow ?? false);
        return reply.header("content-type", "text/plain; charset=utf-8").header("x-content-type-options", "nosniff").send(stream);
      },
    );

    app.patch(
      "/v1/images/:id",
      {
        config: { permission: "image:create" },
        schema: {
          description: "Mark one version (by id) ACTIVE or INACTIVE: an INACTIVE version is never launched; running VMs keep running.",
          params: IdParams,
          body: Type.Object({ status: Type.Union(IMAGE_VERSION_STATUSES.map((st) => Type.Literal(st))) }, { additionalProperties: false }),
          response: { 200: ref("Image") },
        },
      },
      async (req) => imageView(await images.setStatus(req.tenantId, req.params.id, req.body.status)),
    );

    // Tags of an image name (all its versions).
    const imageTags = async (tenantId: string, idOrName: string) => ({ type: "microvm-image" as const, id: (await images.get(tenantId, idOrName)).name });
    app.get("/v1/images/:id/tags", { config: { permission: "image:read" }, schema: { params: IdParams, response: { 200: ref("TagSet") } } }, async (req) => ({
      tags: await listTags(db, req.tenantId, await imageTags(req.tenantId, req.params.id)),
    }));
    app.post(
      "/v1/images/:id/tags",
      { config: { permission: "image:create" }, schema: { params: IdParams, body: Type.Object({ tags: TagsBody }, { additionalProperties: false }), response: { 200: ref("TagSet") } } },
      async (req) => {
        const resource = await imageTags(req.tenantId, req.params.id);
        await tagResource(db, req.tenantId, resource, req.body.tags);
        return { tags: await listTags(db, req.tenantId, resource) };
      },
    );
    app.delete(
      "/v1/images/:id/tags",
      { config: { permission: "image:create" }, schema: { params: IdParams, querystring: Type.Object({ keys: Type.Union([Type.String({ maxLength: 128 }), Type.Array(Type.String({ maxLength: 128 }), { maxItems: 64 })]) }, { additionalProperties: false }), response: { 200: ref("TagSet") } } },
      async (req) => {
        const resource = await imageTags(req.tenantId, req.params.id);
        await untagResource(db, req.tenantId, resource, [req.query.keys].flat());
        return { tags: await listTags(db, req.tenantId, resource) };
      },
    );

    app.delete(
      "/v1/images/:id",
      {
        config: { permission: "image:delete" },
        schema: {
          description: "Deletes the image (by id: that version; by name: all its versions); force=true first terminates the VMs using it.",
          params: IdParams,
          querystring: Type.Object({ force: Type.Optional(Type.Boolean({ default: false })) }, { additionalProperties: false }),
          response: { 200: Type.Object({ imageIds: Type.Array(Type.String(), { description: "the versions deleted" }), deleted: Type.Literal(true) }) },
        },
      },
      async (req) => ({ imageIds: await microvms.deleteImage(req.tenantId, req.params.id, req.query.force ?? false), deleted: true as const }),
    );
  });
  registerRegistryRoutes(root, images.registries);
}

function parseJsonField(field: string, value: string): unknown {
  try {
    return JSON.parse(value);
  } catch {
    throw new ApiError("ValidationError", `${field} must be a JSON object`, { field });
  }
}

function schemaError(errors: { instancePath: string; message?: string }[] | null | undefined): ApiError {
  const first = errors?.[0];
  const field = `body${first?.instancePath.replace(/\//g, ".") ?? ""}`;
  return new ApiError("ValidationError", `${field} ${first?.message ?? "is invalid"}`, { field });
}

/** file:// code URIs are for admin keys (the auth hook already checked the key; this reads its permissions). */
async function isAdmin(db: Db, authorization: string | undefined): Promise<boolean> {
  const apiKey = /^Bearer\s+(\S+)$/i.exec(authorization ?? "")?.[1];
  const key = apiKey ? await findLiveKey(db, apiKey) : undefined;
  return key ? grants(JSON.parse(key.permissions) as string[], "admin:*") : false;
}

/** The API view of an image (docs/api.md). */
export function imageView(row: ImageRow): ImageView {
  const config = JSON.parse(row.config) as { labels?: Record<string, string>; argv?: string[]; volumes?: string[]; stopSignal?: string };
  return {
    imageId: row.id,
    name: row.name,
    managed: false,
    version: row.version,
    state: row.state,
    ...(row.state_reason ? { stateReason: row.state_reason } : {}),
    createdAt: row.created_at,
    ...(row.ready_at ? { readyAt: row.ready_at } : {}),
    sizeBytes: row.size_bytes,
    diskBytes: row.disk_bytes,
    memoryBytes: row.memory_bytes,
    ...(row.app_port ? { appPort: row.app_port } : {}),
    vcpus: row.vcpus,
    memoryMiB: row.memory_mib,
    diskGiB: row.disk_gib,
    dockerfileDigest: row.dockerfile_digest,
    codeDigest: row.code_digest,
    codeSource: row.code_source,
    ...(row.parent_image_id ? { parentImageId: row.parent_image_id } : {}),
    ...(row.source_microvm_id ? { sourceMicroVmId: row.source_microvm_id } : {}),
    ...(row.build_ms !== null ? { buildMs: row.build_ms } : {}),
    command: config.argv ?? [],
    labels: config.labels ?? {},
    status: row.status as ImageVersionStatus,
    ...(row.hooks ? { hooks: JSON.parse(row.hooks) as ImageHooks } : {}),
    ...(row.description ? { description: row.description } : {}),
    ...(row.base_image ? { baseImage: row.base_image } : {}),
    ...(row.egress_connectors ? { egressConnectors: JSON.parse(row.egress_connectors) as string[] } : {}),
    ...(config.volumes?.length ? { volumes: config.volumes } : {}),
    ...(config.stopSignal ? { stopSignal: config.stopSignal } : {}),
  };
}
