import { Type, type Static } from "@fastify/type-provider-typebox";
import { ApiError } from "../../errors.ts";
import type { HookName, HooksRequest, ImageHooks } from "../../images/hooks.ts";
import type { CreateImageRequest, ImageService } from "../../images/service.ts";
import type { ImageState } from "../../images/states.ts";
import type { ImageRow } from "../../store/schema.ts";
import { listTags } from "../../store/tags.ts";
import { grants } from "../auth.ts";
import type { AwsApiDeps, AwsScope } from "./scope.ts";
import { epochSeconds, imageArn, MANAGED_ACCOUNT, managedImageArn, PAGE, paginate, parseArn, parseVersion, resourceName } from "./protocol.ts";
import { CodeArtifact, EnvironmentVariables, Hooks, Logging, Tags } from "./shapes.ts";

const ImageId = Type.Object({ imageIdentifier: Type.String({ minLength: 1, maxLength: 2048 }) });
const VersionId = Type.Object({ imageIdentifier: Type.String({ minLength: 1, maxLength: 2048 }), imageVersion: Type.String({ minLength: 1, maxLength: 16 }) });
const Page = { maxResults: Type.Optional(Type.Integer({ minimum: PAGE.min, maximum: PAGE.max })), nextToken: Type.Optional(Type.String({ maxLength: 1024 })) };

/** The fields of an image definition (CreateMicrovmImage; UpdateMicrovmImage without name and tags). */
const Definition = {
  baseImageArn: Type.String({ minLength: 1, maxLength: 2048 }),
  baseImageVersion: Type.Optional(Type.String({ minLength: 1, maxLength: 16 })),
  buildRoleArn: Type.Optional(Type.String({ maxLength: 2048 })),
  description: Type.Optional(Type.String({ maxLength: 1024 })),
  codeArtifact: CodeArtifact,
  logging: Type.Optional(Logging),
  egressNetworkConnectors: Type.Optional(Type.Array(Type.String({ minLength: 1, maxLength: 64 }), { maxItems: 16 })),
  cpuConfigurations: Type.Optional(Type.Array(Type.Object({ architecture: Type.String({ maxLength: 32 }) }, { additionalProperties: false }), { maxItems: 4 })),
  resources: Type.Optional(Type.Array(Type.Object({ minimumMemoryInMiB: Type.Integer({ minimum: 128, maximum: 32_768 }) }, { additionalProperties: false }), { maxItems: 4 })),
  additionalOsCapabilities: Type.Optional(Type.Array(Type.String({ maxLength: 32 }), { maxItems: 8 })),
  hooks: Type.Optional(Hooks),
  environmentVariables: Type.Optional(EnvironmentVariables),
  clientToken: Type.Optional(Type.String({ minLength: 1, maxLength: 64 })),
};
const CreateBody = Type.Object({ ...Definition, name: Type.String({ minLength: 1, maxLength: 63 }), tags: Type.Optional(Tags) }, { additionalProperties: false });
const UpdateBody = Type.Object(Definition, { additionalProperties: false });
type DefinitionBody = Static<typeof UpdateBody>;

/** The host's architecture, as cpuConfigurations names architectures. */
const HOST_ARCHITECTURE = process.arch === "arm64" ? "ARM_64" : "X86_64";

/**
 * Image operations: images and their versions (one Cocoon build each),
 * builds, and the managed images. An image is a name; each Create/Update is
 * a new version built from the code artifact (a zip with a Dockerfile at its
 * root) on the managed base image.
 */
export function registerImageOperations(scope: AwsScope, deps: AwsApiDeps): void {
  const images = (): ImageService => {
    if (!deps.images) throw new ApiError("ValidationError", "this server builds no images (it was started without an image service)");
    return deps.images;
  };

  /** Create and Update: the same build of a new version; a clientToken makes a retry return that version. */
  const build = async (req: { aws: { tenantId: string; permissions: string[] } }, operation: "CreateMicrovmImage" | "UpdateMicrovmImage", name: string, body: DefinitionBody & { tags?: Record<string, string> }) => {
    const service = images();
    const tenantId = req.aws.tenantId;
    const prepare = async (): Promise<CreateImageRequest> => {
      const existing = await service.list(tenantId, { name });
      if (operation === "CreateMicrovmImage" && existing.length) throw new ApiError("Conflict", `image ${name} already exists: UpdateMicrovmImage builds a new version`, { resourceId: name, resourceType: "microvm-image" });
      if (operation === "UpdateMicrovmImage" && !existing.length) throw new ApiError("NotFound", `image ${name} not found`, { resourceId: name, resourceType: "microvm-image" });
      const definition = await translateDefinition(deps, body);
      const code = await service.fetchCode(tenantId, body.codeArtifact.uri, { admin: grants(req.aws.permissions, "admin:*") }).catch((err: Error) => {
        throw err instanceof ApiError ? new ApiError(err.code, err.message.replace("codeUri", "codeArtifact.uri"), { field: "codeArtifact.uri" }) : err;
      });
      return { name, code, ...definition, tags: body.tags };
    };
    // create() consumes the staged code in every case.
    if (body.clientToken === undefined) return service.create(tenantId, await prepare());
    const { clientToken, ...request } = body;
    return service.createOnce(tenantId, { operation, clientToken }, { name, ...request }, prepare);
  };

  scope.post("/microvm-images", { config: { awsPermission: "image:create" }, schema: { body: CreateBody } }, async (req, reply) => {
    const row = await build(req, "CreateMicrovmImage", req.body.name, req.body);
    return reply.status(201).send(await imageWithVersion(deps, req.aws.tenantId, req.aws.region, row));
  });

  scope.put("/microvm-images/:imageIdentifier", { config: { awsPermission: "image:create" }, schema: { params: ImageId, body: UpdateBody } }, async (req) => {
    const name = resourceName(req.params.imageIdentifier, req.aws.tenantId, "microvm-image", "imageIdentifier");
    const row = await build(req, "UpdateMicrovmImage", (await images().get(req.aws.tenantId, name)).name, req.body);
    return imageWithVersion(deps, req.aws.tenantId, req.aws.region, row);
  });

  scope.get("/microvm-images/:imageIdentifier", { config: { awsPermission: "image:read" }, schema: { params: ImageId } }, async (req) => {
    const versions = await versionsOf(images(), req.aws.tenantId, req.params.imageIdentifier);
    return { ...imageSummary(versions, req.aws.tenantId, req.aws.region), tags: await listTags(deps.db, req.aws.tenantId, { type: "microvm-image", id: versions[0]!.name }) };
  });

  scope.get(
    "/microvm-images",
    {
      config: { awsPermission: "image:read" },
      schema: { querystring: Type.Object({ ...Page, nameFilter: Type.Optional(Type.String({ maxLength: 63 })) }, { additionalProperties: false }) },
    },
    async (req) => {
      const rows = deps.images ? await deps.images.list(req.aws.tenantId) : [];
      const byName = new Map<string, ImageRow[]>();
      for (const r of rows) if (!req.query.nameFilter || r.name.includes(req.query.nameFilter)) byName.set(r.name, [...(byName.get(r.name) ?? []), r]);
      const page = paginate([...byName.keys()].sort(), (n) => n, req.query);
      return { items: page.items.map((n) => imageSummary(byName.get(n)!, req.aws.tenantId, req.aws.region)), ...(page.nextToken ? { nextToken: page.nextToken } : {}) };
    },
  );

  scope.delete("/microvm-images/:imageIdentifier", { config: { awsPermission: "image:delete" }, schema: { params: ImageId } }, async (req) => {
    const name = (await versionsOf(images(), req.aws.tenantId, req.params.imageIdentifier))[0]!.name;
    await deps.microvms.deleteImage(req.aws.tenantId, name, false);
    return { imageIdentifier: req.params.imageIdentifier, state: "DELETED" };
  });

  scope.get("/microvm-images/:imageIdentifier/versions/:imageVersion", { config: { awsPermission: "image:read" }, schema: { params: VersionId } }, async (req) =>
    versionView(deps, req.aws.tenantId, req.aws.region, await versionOf(images(), req.aws.tenantId, req.params)),
  );

  scope.get(
    "/microvm-images/:imageIdentifier/versions",
    { config: { awsPermission: "image:read" }, schema: { params: ImageId, querystring: Type.Object(Page, { additionalProperties: false }) } },
    async (req) => {
      const page = paginate(await versionsOf(images(), req.aws.tenantId, req.params.imageIdentifier), (r) => r.version, req.query);
      const items = await Promise.all(page.items.map((r) => versionView(deps, req.aws.tenantId, req.aws.region, r)));
      return { items, ...(page.nextToken ? { nextToken: page.nextToken } : {}) };
    },
  );

  scope.patch(
    "/microvm-images/:imageIdentifier/versions/:imageVersion",
    {
      config: { awsPermission: "image:create" },
      schema: { params: VersionId, body: Type.Object({ status: Type.Union([Type.Literal("ACTIVE"), Type.Literal("INACTIVE")]) }, { additionalProperties: false }) },
    },
    async (req) => {
      const row = await versionOf(images(), req.aws.tenantId, req.params);
      return versionView(deps, req.aws.tenantId, req.aws.region, await images().setStatus(req.aws.tenantId, row.id, req.body.status));
    },
  );

  scope.delete("/microvm-images/:imageIdentifier/versions/:imageVersion", { config: { awsPermission: "image:delete" }, schema: { params: VersionId } }, async (req) => {
    const row = await versionOf(images(), req.aws.tenantId, req.params);
    await deps.microvms.deleteImage(req.aws.tenantId, row.id, false);
    return { imageIdentifier: req.params.imageIdentifier, imageVersion: String(row.version), state: "DELETED" };
  });

  // One build per version: its id is the version's Cocoon image id.
  scope.get(
    "/microvm-images/:imageIdentifier/versions/:imageVersion/builds",
    {
      config: { awsPermission: "image:read" },
      schema: {
        params: VersionId,
        querystring: Type.Object(
          {
            ...Page,
            architecture: Type.Optional(Type.String({ maxLength: 32 })),
            chipset: Type.Optional(Type.String({ maxLength: 32 })),
            chipsetGeneration: Type.Optional(Type.String({ maxLength: 32 })),
          },
          { additionalProperties: false },
        ),
      },
    },
    async (req) => {
      const row = await versionOf(images(), req.aws.tenantId, req.params);
      const q = req.query;
      const matches = (q.architecture ?? HOST_ARCHITECTURE) === HOST_ARCHITECTURE && (q.chipset ?? CHIPSET) === CHIPSET && (q.chipsetGeneration ?? CHIPSET_GENERATION) === CHIPSET_GENERATION;
      const page = paginate(matches ? [row] : [], (r) => r.id, q);
      return { items: page.items.map((r) => buildView(r, req.aws.tenantId, req.aws.region)), ...(page.nextToken ? { nextToken: page.nextToken } : {}) };
    },
  );

  scope.get(
    "/microvm-images/:imageIdentifier/versions/:imageVersion/builds/:buildId",
    { config: { awsPermission: "image:read" }, schema: { params: Type.Object({ ...VersionId.properties, buildId: Type.String({ minLength: 1, maxLength: 128 }) }) } },
    async (req) => {
      const row = await versionOf(images(), req.aws.tenantId, req.params);
      if (req.params.buildId !== row.id) throw new ApiError("NotFound", `image ${row.name} version ${row.version} has no build ${req.params.buildId} (its build is ${row.id})`, { resourceId: req.params.buildId, resourceType: "build" });
      return {
        ...buildView(row, req.aws.tenantId, req.aws.region),
        ...(row.state === "READY" ? { snapshotBuild: { memorySnapshotSizeInBytes: row.memory_bytes, diskSnapshotSizeInBytes: row.disk_bytes } } : {}),
      };
    },
  );

  scope.get("/managed-microvm-images", { config: { awsPermission: "image:read" }, schema: { querystring: Type.Object(Page, { additionalProperties: false }) } }, async (req) => {
    const page = paginate(deps.microvms.managedImages(), (m) => m.name, req.query);
    return {
      items: page.items.map((m) => ({ imageArn: managedImageArn(req.aws.region, m.name), createdAt: Date.parse(m.createdAt) / 1000, updatedAt: Date.parse(m.createdAt) / 1000 })),
      ...(page.nextToken ? { nextToken: page.nextToken } : {}),
    };
  });

  scope.get(
    "/managed-microvm-images/:imageIdentifier/versions",
    { config: { awsPermission: "image:read" }, schema: { params: ImageId, querystring: Type.Object(Page, { additionalProperties: false }) } },
    async (req) => {
      const managed = await managedImage(deps, req.params.imageIdentifier, "imageIdentifier");
      const page = paginate([managed], (m) => m.version, req.query);
      return {
        items: page.items.map((m) => ({
          imageArn: managedImageArn(req.aws.region, m.name),
          imageVersion: String(m.version),
          status: "AVAILABLE",
          createdAt: Date.parse(m.createdAt) / 1000,
          updatedAt: Date.parse(m.createdAt) / 1000,
        })),
        ...(page.nextToken ? { nextToken: page.nextToken } : {}),
      };
    },
  );
}

/** Builds run on this host's CPU: reported as its architecture, a generic chipset, generation 1. */
const CHIPSET = "GENERIC";
const CHIPSET_GENERATION = "1";

/** A managed image named by ARN (account "aws") or name; 400 naming the field otherwise. */
async function managedImage(deps: AwsApiDeps, value: string, field: string) {
  const arn = value.startsWith("arn:") ? parseArn(value) : undefined;
  if (value.startsWith("arn:") && (!arn || arn.account !== MANAGED_ACCOUNT || arn.type !== "microvm-image")) {
    throw new ApiError("ValidationError", `${field} ${value} is not a managed image ARN (arn:aws:lambda:{region}:aws:microvm-image/{name}); ListManagedMicrovmImages lists them`, { field });
  }
  const name = arn?.id ?? value;
  const managed = deps.microvms.managedImages().find((m) => m.name === name);
  if (!managed) throw new ApiError("NotFound", `no managed image ${name}; ListManagedMicrovmImages lists them`, { resourceId: value, resourceType: "managed-microvm-image" });
  return managed;
}

/** The AWS definition fields as Cocoon's image request; fields Cocoon cannot honour are kept only to echo them back. */
async function translateDefinition(deps: AwsApiDeps, body: DefinitionBody): Promise<Omit<CreateImageRequest, "name" | "code">> {
  const base = await managedImage(deps, body.baseImageArn, "baseImageArn").catch((err: ApiError) => {
    throw new ApiError("ValidationError", err.message, { field: "baseImageArn" });
  });
  if (body.baseImageVersion !== undefined && parseVersion(body.baseImageVersion, "baseImageVersion") !== base.version) {
    throw new ApiError("ValidationError", `managed image ${base.name} has version ${base.version} only, not ${body.baseImageVersion}`, { field: "baseImageVersion" });
  }
  for (const cpu of body.cpuConfigurations ?? []) {
    if (cpu.architecture !== HOST_ARCHITECTURE) {
      throw new ApiError("ValidationError", `cpuConfigurations: ${cpu.architecture} is not available: this host runs ${HOST_ARCHITECTURE} and Cocoon does not emulate another architecture`, {
        field: "cpuConfigurations",
      });
    }
  }
  if (body.egressNetworkConnectors) await deps.microvms.connectors.egressOf(body.egressNetworkConnectors, "egressNetworkConnectors");
  return {
    baseImage: base.name,
    memoryMiB: body.resources?.length ? Math.max(...body.resources.map((r) => r.minimumMemoryInMiB)) : undefined,
    env: body.environmentVariables,
    hooks: body.hooks ? hooksRequest(body.hooks) : undefined,
    description: body.description,
    egressConnectors: body.egressNetworkConnectors,
    awsFields: {
      ...(body.buildRoleArn !== undefined ? { buildRoleArn: body.buildRoleArn } : {}),
      ...(body.baseImageVersion !== undefined ? { baseImageVersion: body.baseImageVersion } : {}),
      ...(body.logging !== undefined ? { logging: body.logging } : {}),
      ...(body.cpuConfigurations !== undefined ? { cpuConfigurations: body.cpuConfigurations } : {}),
      ...(body.additionalOsCapabilities !== undefined ? { additionalOsCapabilities: body.additionalOsCapabilities } : {}),
      ...(body.environmentVariables !== undefined ? { environmentVariables: body.environmentVariables } : {}),
    },
  };
}

type AwsHooks = Static<typeof Hooks>;

/** AWS hooks (a state and a timeout per hook) as Cocoon's: a hook is on unless DISABLED. */
function hooksRequest(hooks: AwsHooks): HooksRequest {
  if (hooks.port === undefined) throw new ApiError("ValidationError", "hooks.port is required: the guest port the hook listener serves", { field: "hooks.port" });
  const states: Record<HookName, string | undefined> = {
    ready: hooks.microvmImageHooks?.ready,
    validate: hooks.microvmImageHooks?.validate,
    run: hooks.microvmHooks?.run,
    suspend: hooks.microvmHooks?.suspend,
    resume: hooks.microvmHooks?.resume,
    terminate: hooks.microvmHooks?.terminate,
  };
  const timeouts: Record<HookName, number | undefined> = {
    ready: hooks.microvmImageHooks?.readyTimeoutInSeconds,
    validate: hooks.microvmImageHooks?.validateTimeoutInSeconds,
    run: hooks.microvmHooks?.runTimeoutInSeconds,
    suspend: hooks.microvmHooks?.suspendTimeoutInSeconds,
    resume: hooks.microvmHooks?.resumeTimeoutInSeconds,
    terminate: hooks.microvmHooks?.terminateTimeoutInSeconds,
  };
  const names = Object.keys(states) as HookName[];
  return {
    port: hooks.port,
    enabled: names.filter((n) => states[n] !== "DISABLED"),
    timeoutSeconds: Object.fromEntries(names.filter((n) => timeouts[n] !== undefined).map((n) => [n, timeouts[n]])),
  };
}

/** Cocoon's hooks in AWS's shape. */
function awsHooks(hooks: ImageHooks) {
  const state = (n: HookName) => (hooks.hooks[n] ? "ENABLED" : "DISABLED");
  const timeout = (n: HookName) => hooks.hooks[n]?.timeoutSeconds;
  return {
    port: hooks.port,
    microvmHooks: {
      run: state("run"),
      runTimeoutInSeconds: timeout("run"),
      resume: state("resume"),
      resumeTimeoutInSeconds: timeout("resume"),
      suspend: state("suspend"),
      suspendTimeoutInSeconds: timeout("suspend"),
      terminate: state("terminate"),
      terminateTimeoutInSeconds: timeout("terminate"),
    },
    microvmImageHooks: { ready: state("ready"), readyTimeoutInSeconds: timeout("ready"), validate: state("validate"), validateTimeoutInSeconds: timeout("validate") },
  };
}

/** Every version of an image named by name, ARN or a version's id; oldest first. */
async function versionsOf(images: ImageService, tenantId: string, identifier: string): Promise<ImageRow[]> {
  const name = (await images.get(tenantId, resourceName(identifier, tenantId, "microvm-image", "imageIdentifier"))).name;
  return images.list(tenantId, { name });
}

async function versionOf(images: ImageService, tenantId: string, params: { imageIdentifier: string; imageVersion: string }): Promise<ImageRow> {
  return images.getVersion(tenantId, resourceName(params.imageIdentifier, tenantId, "microvm-image", "imageIdentifier"), parseVersion(params.imageVersion));
}

/** A version's state: BUILDING is IN_PROGRESS, READY SUCCESSFUL. */
function versionState(state: ImageState): string {
  switch (state) {
    case "PENDING":
      return "PENDING";
    case "BUILDING":
      return "IN_PROGRESS";
    case "READY":
      return "SUCCESSFUL";
    case "FAILED":
      return "FAILED";
    case "DELETING":
      return "DELETING";
    default: {
      const never: never = state;
      throw new Error(`unknown image state ${String(never)}`);
    }
  }
}

/**
 * An image's state from its versions: the first build is CREATING →
 * CREATED | CREATE_FAILED, later ones UPDATING → UPDATED | UPDATE_FAILED.
 */
function imageState(versions: ImageRow[]): string {
  const latest = versions.at(-1)!;
  const first = versions.length === 1;
  switch (latest.state as ImageState) {
    case "PENDING":
    case "BUILDING":
      return first ? "CREATING" : "UPDATING";
    case "READY":
      return first ? "CREATED" : "UPDATED";
    case "FAILED":
      return first ? "CREATE_FAILED" : "UPDATE_FAILED";
    case "DELETING":
      return "DELETING";
    default:
      return "CREATED";
  }
}

function imageSummary(versions: ImageRow[], tenantId: string, region: string) {
  const latestActive = [...versions].reverse().find((r) => r.state === "READY" && r.status === "ACTIVE");
  const latestFailed = [...versions].reverse().find((r) => r.state === "FAILED");
  return {
    imageArn: imageArn(region, tenantId, versions[0]!.name),
    name: versions[0]!.name,
    state: imageState(versions),
    createdAt: epochSeconds(versions[0]!.created_at),
    updatedAt: epochSeconds(versions.at(-1)!.created_at),
    ...(latestActive ? { latestActiveImageVersion: String(latestActive.version) } : {}),
    ...(latestFailed ? { latestFailedImageVersion: String(latestFailed.version) } : {}),
  };
}

/** Create's and Update's answer: the image and the version just made. */
async function imageWithVersion(deps: AwsApiDeps, tenantId: string, region: string, row: ImageRow) {
  const versions = await deps.images!.list(tenantId, { name: row.name });
  return { ...(await versionView(deps, tenantId, region, row)), ...imageSummary(versions, tenantId, region), imageVersion: String(row.version) };
}

/** A version with its definition (MicrovmImageVersionSummary). */
async function versionView(deps: AwsApiDeps, tenantId: string, region: string, row: ImageRow) {
  const fields = (row.aws_fields ? JSON.parse(row.aws_fields) : {}) as Record<string, unknown>;
  const hooks = row.hooks ? (JSON.parse(row.hooks) as ImageHooks) : undefined;
  return {
    baseImageArn: managedImageArn(region, row.base_image ?? "base"),
    ...(fields.baseImageVersion !== undefined ? { baseImageVersion: fields.baseImageVersion } : {}),
    buildRoleArn: (fields.buildRoleArn as string | undefined) ?? "",
    ...(row.description ? { description: row.description } : {}),
    codeArtifact: { uri: row.code_source },
    ...(fields.logging !== undefined ? { logging: fields.logging } : {}),
    egressNetworkConnectors: row.egress_connectors ? (JSON.parse(row.egress_connectors) as string[]) : [],
    ...(fields.cpuConfigurations !== undefined ? { cpuConfigurations: fields.cpuConfigurations } : {}),
    resources: [{ minimumMemoryInMiB: row.memory_mib }],
    ...(fields.additionalOsCapabilities !== undefined ? { additionalOsCapabilities: fields.additionalOsCapabilities } : {}),
    ...(hooks ? { hooks: awsHooks(hooks) } : {}),
    environmentVariables: (fields.environmentVariables as Record<string, string> | undefined) ?? {},
    imageArn: imageArn(region, tenantId, row.name),
    imageVersion: String(row.version),
    state: versionState(row.state as ImageState),
    status: row.status,
    createdAt: epochSeconds(row.created_at),
    ...(row.ready_at ? { updatedAt: epochSeconds(row.ready_at) } : {}),
    ...(row.state_reason ? { stateReason: row.state_reason } : {}),
    tags: await listTags(deps.db, tenantId, { type: "microvm-image", id: row.name }),
  };
}

/** A build (one per version): its state and reason. */
function buildView(row: ImageRow, tenantId: string, region: string) {
  return {
    imageArn: imageArn(region, tenantId, row.name),
    imageVersion: String(row.version),
    buildId: row.id,
    buildState: buildState(row.state as ImageState),
    architecture: HOST_ARCHITECTURE,
    chipset: CHIPSET,
    chipsetGeneration: CHIPSET_GENERATION,
    createdAt: epochSeconds(row.created_at),
    ...(row.state_reason ? { stateReason: row.state_reason } : {}),
  };
}

/** BuildState: PENDING, IN_PROGRESS, SUCCESSFUL, FAILED (a version being deleted had succeeded). */
function buildState(state: ImageState): string {
  const s = versionState(state);
  return s === "DELETING" ? "SUCCESSFUL" : s;
}
