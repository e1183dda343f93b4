/**
 * Shapes of the Cocoon API (docs/api.md). What the server answers comes from
 * `api.gen.ts`, generated from the server's OpenAPI document (`npm run
 * gen:api`): named here, never copied. The server may add fields; none is
 * removed within v1. Options the SDK takes are its own, below.
 */
import type { components, paths } from "./api.gen.ts";

type Schemas = components["schemas"];

/** A microVM's lifecycle state (the transitions are in its documentation). */
export type MicroVmState = Schemas["MicroVmState"];

/** A microVM as the API describes it (`GET /v1/microvms/{id}`). */
export type MicroVmInfo = Schemas["MicroVm"];

/** Outbound network access: none, the public internet (no host, private or link-local addresses), or an allow-list of CIDRs and host names (`*.debian.org`). */
export type Egress = MicroVmInfo["network"]["egress"];

/** A page of `GET /v1/microvms`: newest first, `nextToken` while more follow. */
export type MicroVmPage = Schemas["MicroVmPage"];

export type MicroVmEvent = Schemas["MicroVmEvents"]["events"][number];

export type ExecResult = Schemas["ExecResult"];

export type FileEntry = Schemas["FileListing"]["entries"][number];

export type WriteInfo = Schemas["FileWritten"];

export type ImageState = Schemas["ImageState"];

export type ImageInfo = Schemas["Image"];
/** A persistent volume (`client.volumes`). */
export type VolumeInfo = Schemas["Volume"];

export type TenantInfo = Schemas["Tenant"];

export type CreatedKey = Schemas["CreatedApiKey"];

export type KeyInfo = Schemas["ApiKey"];

export type Health = Schemas["Health"];

/** An error code the API answers with (its meaning is in the type's documentation). */
export type ApiErrorCode = Schemas["ErrorCode"];

/** The body of every error answer: `{"error": {code, message, details?}}`. */
export type ErrorEnvelope = Schemas["ErrorEnvelope"];

type JsonBody<Operation> = Operation extends { requestBody?: { content: { "application/json": infer Body } } } ? Body : never;
type CreateMicroVmBody = JsonBody<paths["/v1/microvms"]["post"]>;

/** What `client.microvms.create` accepts: the body of `POST /v1/microvms`, with `image` defaulting to `"base"` (Debian bookworm with the agent, always READY). */
export type CreateMicroVmOpts = Omit<CreateMicroVmBody, "image"> & { image?: string };

/** Idle auto-suspend, auto-resume and auto-terminate of a VM. */
export type IdlePolicy = NonNullable<CreateMicroVmOpts["idlePolicy"]>;

/** The query of `GET /v1/microvms`. */
export type ListMicroVmsOpts = Omit<NonNullable<paths["/v1/microvms"]["get"]["parameters"]["query"]>, "state"> & { state?: MicroVmState };

/** Options of `vm.exec` and `vm.execStream`: the body of `POST /v1/microvms/{id}/exec` but the command. */
export type ExecOpts = Omit<JsonBody<paths["/v1/microvms/{id}/exec"]["post"]>, "command">;

/** One line of a streamed exec: output as it comes, then the exit. */
export type ExecEvent = { type: "stdout"; data: string } | { type: "stderr"; data: string } | { type: "exit"; exitCode: number; durationMs?: number; timedOut?: boolean };

/** What `client.images.create` accepts: the Dockerfile and the code as a .zip (uploaded), or a `codeUri` the server fetches. */
export interface CreateImageOpts {
  /** Unique name within the tenant, used by `microvms.create({image})`. */
  name: string;
  /** The Dockerfile's text. */
  dockerfile: string;
  /** The build context as a .zip (bytes or a Blob). Exactly one of `code` and `codeUri`. */
  code?: Uint8Array | Blob;
  /** `s3://bucket/key`, `https://…` or `file://…` (server-local, admin only). */
  codeUri?: string;
}

/** The body of `POST /v1/keys`: permissions are e.g. `["microvm:*", "image:read"]` (docs/api.md lists the actions). */
export type CreateKeyOpts = JsonBody<paths["/v1/keys"]["post"]>;


/** The body of `POST /v1/volumes`. */
export type CreateVolumeOpts = JsonBody<paths["/v1/volumes"]["post"]>;
