import { Type, type Static, type TSchema } from "@fastify/type-provider-typebox";
import { ERROR_CODES, type ErrorCode } from "../errors.ts";
import { HOOK_NAMES } from "../images/hooks.ts";
import { IMAGE_VERSION_STATUSES, type ImageVersionStatus } from "../images/service.ts";
import { IMAGE_STATES, MICROVM_STATES, type ImageState, type MicroVmState } from "../store/schema.ts";

/*
 * The shapes `/v1` answers with, as named schemas of the OpenAPI document
 * (`GET /v1/openapi.json`, components.schemas). Routes refer to them by name
 * (`ref`); the views that build the answers are typed by them (`Static`), so
 * a view and its documented shape cannot part. The SDK's and the console's
 * types are generated from the document (`npm run gen:api`).
 */

const enumOf = <T extends string>(values: readonly T[], options: { $id: string; description: string }) =>
  Type.Unsafe<T>({ type: "string", enum: [...values], ...options });
const iso = (description: string) => Type.String({ format: "date-time", description });
const Tags = Type.Record(Type.String(), Type.String(), { description: "the resource's tags, key to value" });

export const ErrorCodeSchema = enumOf(Object.keys(ERROR_CODES) as ErrorCode[], {
  $id: "ErrorCode",
  description: Object.entries(ERROR_CODES)
    .map(([code, { status, doc }]) => `${code} (${status}): ${doc}`)
    .join("\n"),
});

export const ErrorEnvelope = Type.Object(
  {
    error: Type.Object({
      code: Type.Ref("ErrorCode"),
      message: Type.String({ description: "what went wrong; for a bad field, the field and its limit" }),
      details: Type.Optional(Type.Record(Type.String(), Type.Unknown(), { description: "facts for programs, e.g. {field} for a ValidationError, {state} for an InvalidState" })),
    }),
  },
  { $id: "ErrorEnvelope", description: "Every error answer of /v1 (and a streamed exec's last line when its stream fails)." },
);

export const MicroVmStateSchema = enumOf<MicroVmState>(MICROVM_STATES, {
  $id: "MicroVmState",
  description:
    "PENDING (the create is in flight) → RUNNING → SUSPENDING → SUSPENDED → RESUMING → RUNNING; PENDING, RUNNING, SUSPENDED or FAILED → TERMINATING → TERMINATED; any but TERMINATED → FAILED (launch failed, the VM's process died, lost in a restart); on a cluster, RUNNING, SUSPENDING or RESUMING → SUSPENDED at its restore point when its node fails and it opted in (onNodeFailure \"restore\").",
});

export const ImageStateSchema = enumOf<ImageState>(IMAGE_STATES, {
  $id: "ImageState",
  description: "PENDING (the build waits for a slot) → BUILDING → READY; PENDING or BUILDING → FAILED; READY or FAILED → DELETING while a delete removes it.",
});

const Egress = Type.Union([Type.Literal("none"), Type.Literal("internet"), Type.Object({ allow: Type.Array(Type.String()) })], {
  description: 'outbound access: "none", "internet" (public addresses only), or {allow: [CIDR or host name, …]}',
});

export const MicroVmSchema = Type.Object(
  {
    microVmId: Type.String(),
    image: Type.String({ description: "the image's name" }),
    imageId: Type.String(),
    imageVersion: Type.Optional(Type.Integer({ description: "the version launched (absent for managed images)" })),
    state: Type.Ref("MicroVmState"),
    stateReason: Type.Optional(Type.String({ description: "why it is in its state, e.g. the failure of a FAILED VM" })),
    vcpus: Type.Integer(),
    memoryMiB: Type.Integer(),
    diskGiB: Type.Integer(),
    createdAt: iso("when it was created"),
    expiresAt: iso("when maxRuntimeSeconds ends it"),
    lastActivityAt: iso("the last request, exec or file call (idle suspend counts from here)"),
    terminatedAt: Type.Optional(iso("when it ended")),
    idlePolicy: Type.Object({
      suspendAfterSeconds: Type.Integer({ description: "suspend after this many idle seconds; 0 never" }),
      autoResume: Type.Boolean({ description: "resume on the next request or exec" }),
      terminateAfterSuspendedSeconds: Type.Integer({ description: "terminate after this many seconds suspended; 0 never" }),
    }),
    maxRuntimeSeconds: Type.Integer(),
    onNodeFailure: Type.Union([Type.Literal("fail"), Type.Literal("restore")], {
      description: 'cluster: what becomes of it when its node fails while it runs: "fail" (FAILED) or "restore" (resumed elsewhere from its last published suspend; the event "restored" says what was lost)',
    }),
    network: Type.Object({ egress: Egress, egressConnectors: Type.Optional(Type.Array(Type.String(), { description: "the named connectors it was created with" })) }),
    endpoint: Type.Object({
      url: Type.String({ description: "http://{id}.{domain}:{port}/" }),
      token: Type.String({ description: "authorizes requests to the endpoint (X-aws-proxy-auth or ?cocoon_token=)" }),
      public: Type.Boolean({ description: "served without a token" }),
      appPort: Type.Optional(Type.Integer({ description: "the guest port the endpoint reaches" })),
    }),
    metadata: Type.Record(Type.String(), Type.Unknown(), { description: "the caller's labels, as given" }),
    forkedFrom: Type.Optional(Type.String({ description: "the microVM it was forked from (POST /v1/microvms/{id}/fork)" })),
  },
  { $id: "MicroVm", description: "A microVM (GET /v1/microvms/{id})." },
);

export const MicroVmPage = Type.Object(
  {
    microVms: Type.Array(Type.Ref("MicroVm")),
    nextToken: Type.Optional(Type.String({ description: "present when more VMs follow: pass it as ?nextToken= for the next page" })),
  },
  { $id: "MicroVmPage", description: "One page of the tenant's microVMs, newest first (by createdAt, then microVmId, descending); the cursor is stable under inserts." },
);

export const MicroVmEvents = Type.Object(
  { events: Type.Array(Type.Object({ type: Type.String({ description: "e.g. created, suspended, resumed, terminated" }), message: Type.String(), at: iso("when") })) },
  { $id: "MicroVmEvents", description: "A microVM's lifecycle events, oldest first." },
);

export const ExecResultSchema = Type.Object(
  {
    exitCode: Type.Integer(),
    stdout: Type.String(),
    stderr: Type.String(),
    durationMs: Type.Integer(),
    timedOut: Type.Optional(Type.Literal(true, { description: "the command was killed at timeoutSeconds" })),
    truncated: Type.Optional(
      Type.Object({ stdout: Type.Optional(Type.Literal(true)), stderr: Type.Optional(Type.Literal(true)) }, { description: "streams cut at the agent's output limit" }),
    ),
  },
  { $id: "ExecResult", description: "A command run to completion (POST /v1/microvms/{id}/exec without Accept: application/x-ndjson)." },
);

export const FileListing = Type.Object(
  {
    path: Type.String(),
    entries: Type.Array(
      Type.Object({
        name: Type.String(),
        type: Type.Union([Type.Literal("file"), Type.Literal("dir"), Type.Literal("symlink"), Type.Literal("other")]),
        size: Type.Integer({ description: "bytes" }),
        mode: Type.String({ description: 'octal permission bits, e.g. "0644"' }),
        mtime: iso("last modification"),
      }),
    ),
  },
  { $id: "FileListing", description: "A directory's entries (GET …/files on a directory; a file answers with its bytes)." },
);

export const FileWritten = Type.Object({ path: Type.String(), size: Type.Integer({ description: "bytes written" }) }, { $id: "FileWritten" });

const ImageVersionStatusSchema = Type.Unsafe<ImageVersionStatus>({
  type: "string",
  enum: [...IMAGE_VERSION_STATUSES],
  description: "ACTIVE versions launch; an INACTIVE one never does (running VMs keep running)",
});

export const ImageSchema = Type.Object(
  {
    imageId: Type.String(),
    name: Type.String(),
    managed: Type.Boolean({ description: "a built-in image (base, python, node, …): always READY, not deletable" }),
    version: Type.Integer({ description: "builds of one name are versions 1, 2, …" }),
    state: Type.Ref("ImageState"),
    stateReason: Type.Optional(Type.String({ description: "why it is in its state, e.g. a FAILED build's error" })),
    createdAt: iso("when the build was asked for"),
    readyAt: Type.Optional(iso("when it became READY")),
    sizeBytes: Type.Optional(Type.Integer({ description: "disk and memory of its snapshot on the host" })),
    diskBytes: Type.Optional(Type.Integer()),
    memoryBytes: Type.Optional(Type.Integer()),
    appPort: Type.Optional(Type.Integer({ description: "the port its app listens on (EXPOSE)" })),
    vcpus: Type.Optional(Type.Integer()),
    memoryMiB: Type.Optional(Type.Integer()),
    diskGiB: Type.Integer(),
    dockerfileDigest: Type.Optional(Type.String()),
    codeDigest: Type.Optional(Type.String()),
    codeSource: Type.Optional(Type.String({ description: "upload, or the code URI" })),
    parentImageId: Type.Optional(Type.String({ description: "the image it was built FROM" })),
    buildMs: Type.Optional(Type.Integer()),
    command: Type.Optional(Type.Array(Type.String(), { description: "the app's argv (ENTRYPOINT + CMD)" })),
    labels: Type.Optional(Type.Record(Type.String(), Type.String())),
    status: Type.Optional(ImageVersionStatusSchema),
    hooks: Type.Optional(
      Type.Object({
        port: Type.Integer(),
        // Partial: a record over a union of names would require every name.
        hooks: Type.Partial(Type.Record(Type.Union(HOOK_NAMES.map((n) => Type.Literal(n))), Type.Object({ timeoutSeconds: Type.Integer() })), { description: "the enabled hooks" }),
      }),
    ),
    description: Type.Optional(Type.String()),
    baseImage: Type.Optional(Type.String({ description: "the managed image it was built on" })),
    egressConnectors: Type.Optional(Type.Array(Type.String())),
    volumes: Type.Optional(Type.Array(Type.String())),
    stopSignal: Type.Optional(Type.String()),
    packages: Type.Optional(Type.Array(Type.String(), { description: "a managed image's Debian packages" })),
    sourceMicroVmId: Type.Optional(Type.String({ description: "the running microVM this image is a snapshot of (POST /v1/microvms/{id}/snapshots)" })),
  },
  { $id: "Image", description: "A MicroVM image version (GET /v1/images/{id})." },
);

export const ImageList = Type.Object(
  { images: Type.Array(Type.Ref("Image")) },
  { $id: "ImageList", description: "The managed images first, then the tenant's own by name and version." },
);

export const TagSet = Type.Object({ tags: Tags }, { $id: "TagSet" });

export const HealthSchema = Type.Object(
  {
    status: Type.Literal("ok"),
    accelerator: Type.Union([Type.Literal("kvm"), Type.Literal("tcg")], { description: "tcg: software emulation, much slower VMs" }),
    jail: Type.Object({ enabled: Type.Boolean(), cgroupVersion: Type.Optional(Type.Union([Type.Literal(1), Type.Literal(2)])) }),
    version: Type.String(),
  },
  { $id: "Health" },
);

export const TenantSchema = Type.Object(
  {
    tenantId: Type.String(),
    name: Type.String(),
    createdAt: iso("when it was created"),
    s3Allow: Type.Array(Type.String(), { description: 'S3 locations its code URIs may read ("bucket/" or "bucket/prefix")' }),
    quotas: Type.Object({ images: Type.Integer(), suspendedMicroVms: Type.Integer(), baseShapes: Type.Integer(), volumes: Type.Integer(), volumeGiB: Type.Integer() }, { description: "its quotas: its overrides over the operator's defaults" }),
  },
  { $id: "Tenant" },
);

export const ApiKeySchema = Type.Object(
  {
    keyId: Type.String(),
    tenantId: Type.String(),
    permissions: Type.Array(Type.String()),
    description: Type.Optional(Type.String()),
    createdAt: iso("when it was created"),
    revokedAt: Type.Optional(iso("when it was revoked")),
  },
  { $id: "ApiKey" },
);

export const CreatedApiKey = Type.Object(
  { keyId: Type.String(), apiKey: Type.String({ description: "the secret: shown this once" }), tenantId: Type.String(), permissions: Type.Array(Type.String()), createdAt: iso("when it was created") },
  { $id: "CreatedApiKey" },
);

export const VmMetricsSchema = Type.Object(
  {
    at: iso("when the latest sample was taken"),
    cpuPercent: Type.Number(),
    memoryUsedMiB: Type.Number(),
    diskUsedMiB: Type.Number(),
    netRxBytes: Type.Integer(),
    netTxBytes: Type.Integer(),
    samples: Type.Array(Type.Object({ at: iso("when"), cpuPercent: Type.Number(), memoryUsedMiB: Type.Number() }), { description: "recent samples, oldest first" }),
  },
  { $id: "VmMetrics" },
);

export const AccessGrant = Type.Object(
  {
    token: Type.String(),
    header: Type.Literal("X-aws-proxy-auth"),
    expiresAt: iso("when it stops working"),
    url: Type.Optional(Type.String({ description: "a shell token: the WebSocket it opens" })),
  },
  { $id: "AccessGrant" },
);

export const TerminalTicket = Type.Object({ ticket: Type.String({ description: "one use, 30 s: GET …/terminal?ticket=" }), expiresAt: iso("when it expires") }, { $id: "TerminalTicket" });

export const NetworkConnectorSchema = Type.Object(
  { name: Type.String(), allow: Type.Array(Type.String()), description: Type.Optional(Type.String()), createdAt: iso("when it was defined") },
  { $id: "NetworkConnector" },
);

export const RegistryCredentials = Type.Object(
  { host: Type.String(), username: Type.String(), createdAt: iso("when they were stored"), updatedAt: iso("when they were last replaced") },
  { $id: "RegistryCredentials", description: "Credentials for a registry (the password is never answered)." },
);

export const VolumeSchema = Type.Object(
  {
    volumeId: Type.String(),
    name: Type.String(),
    sizeGiB: Type.Integer(),
    state: Type.Union([Type.Literal("AVAILABLE"), Type.Literal("ATTACHED")], { description: "ATTACHED while a microVM that is neither TERMINATED nor FAILED holds it" }),
    attachedTo: Type.Array(
      Type.Object({ microVmId: Type.String(), path: Type.String({ description: "where the guest mounts it" }), readOnly: Type.Boolean() }),
      { description: "the microVMs holding it: one read-write, or any number read-only" },
    ),
    createdAt: iso("when it was created"),
  },
  { $id: "Volume", description: "A persistent volume: an ext4 disk that outlives the microVMs it is attached to (docs/volumes.md)." },
);

/** Every named schema, registered with the app (server.ts). */
export const API_SCHEMAS: TSchema[] = [
  ErrorCodeSchema,
  ErrorEnvelope,
  MicroVmStateSchema,
  ImageStateSchema,
  MicroVmSchema,
  MicroVmPage,
  MicroVmEvents,
  ExecResultSchema,
  FileListing,
  FileWritten,
  ImageSchema,
  ImageList,
  TagSet,
  HealthSchema,
  TenantSchema,
  ApiKeySchema,
  CreatedApiKey,
  VmMetricsSchema,
  AccessGrant,
  TerminalTicket,
  NetworkConnectorSchema,
  RegistryCredentials,
  VolumeSchema,
];

/** A route's answer by the name of its schema. */
export const ref = (id: string) => Type.Ref(id);

/** An answer that is not JSON (a file's bytes, a log), documented by its media types. */
export const nonJson = (description: string, content: Record<string, { schema: unknown }>) => Type.Unsafe<unknown>({ description, content });

/** The static types of the views, for the functions that build them. */
export type MicroVmView = Omit<Static<typeof MicroVmSchema>, "state"> & { state: MicroVmState };
export type ImageView = Omit<Static<typeof ImageSchema>, "state"> & { state: ImageState };
export type VolumeView = Static<typeof VolumeSchema>;
