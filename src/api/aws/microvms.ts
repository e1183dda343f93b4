import { Type } from "@fastify/type-provider-typebox";
import { ApiError } from "../../errors.ts";
import { TryPeersError } from "../../lifecycle/cluster.ts";
import type { MicroVmState } from "../../lifecycle/states.ts";
import { grantAccessToken, grantShellToken, type PortSpec } from "../../router/access-grants.ts";
import { NodeChannel } from "../../router/node-channel.ts";
import type { MicroVmRow } from "../../store/schema.ts";
import { INTERNET_CONNECTOR } from "../../lifecycle/connectors.ts";
import type { AwsApiDeps, AwsScope } from "./scope.ts";
import { awsMicroVmState, decodePageToken, encodePageToken, epochSeconds, imageArn, managedImageArn, PAGE, parseVersion, resourceName } from "./protocol.ts";
import { Logging } from "./shapes.ts";

/** The header a client sends an auth token in (the key of the authToken map). */
const PROXY_AUTH_HEADER = "X-aws-proxy-auth";

const Id = Type.Object({ microvmIdentifier: Type.String({ minLength: 1, maxLength: 2048 }) });
const ConnectorNames = Type.Array(Type.String({ minLength: 1, maxLength: 64 }), { maxItems: 16 });

const RunBody = Type.Object(
  {
    imageIdentifier: Type.String({ minLength: 1, maxLength: 2048 }),
    imageVersion: Type.Optional(Type.String({ minLength: 1, maxLength: 16 })),
    ingressNetworkConnectors: Type.Optional(ConnectorNames),
    egressNetworkConnectors: Type.Optional(ConnectorNames),
    executionRoleArn: Type.Optional(Type.String({ maxLength: 2048 })),
    idlePolicy: Type.Optional(
      Type.Object(
        {
          maxIdleDurationSeconds: Type.Optional(Type.Integer({ minimum: 60, maximum: 28_800 })),
          suspendedDurationSeconds: Type.Optional(Type.Integer({ minimum: 0, maximum: 28_800 })),
          autoResumeEnabled: Type.Optional(Type.Boolean()),
        },
        { additionalProperties: false },
      ),
    ),
    logging: Type.Optional(Logging),
    // Bytes are checked by the lifecycle (16 KiB); this bounds the characters before that.
    runHookPayload: Type.Optional(Type.String({ maxLength: 16 * 1024 })),
    maximumDurationInSeconds: Type.Optional(Type.Integer({ minimum: 1, maximum: 28_800 })),
    clientToken: Type.Optional(Type.String({ minLength: 1, maxLength: 64 })),
  },
  { additionalProperties: false },
);

const PortSpecification = Type.Object(
  {
    port: Type.Optional(Type.Integer({ minimum: 1, maximum: 65_535 })),
    range: Type.Optional(Type.Object({ startPort: Type.Integer({ minimum: 1, maximum: 65_535 }), endPort: Type.Integer({ minimum: 1, maximum: 65_535 }) }, { additionalProperties: false })),
    allPorts: Type.Optional(Type.Object({}, { additionalProperties: false })),
  },
  { additionalProperties: false, minProperties: 1, maxProperties: 1 },
);

/**
 * MicroVM operations: RunMicrovm, GetMicrovm, ListMicrovms, SuspendMicrovm,
 * ResumeMicrovm, TerminateMicrovm, CreateMicrovmAuthToken and
 * CreateMicrovmShellAuthToken, each one lifecycle call.
 */
export function registerMicroVmOperations(scope: AwsScope, deps: AwsApiDeps): void {
  const { microvms } = deps;
  /** Names of the managed images (reserved names: no tenant image has one). */
  const managedNames = () => new Set(microvms.managedImages().map((m) => m.name));
  const view = async (row: MicroVmRow, region: string) => microVmView(row, region, deps.endpointUrl(row.id), managedNames());

  scope.post("/microvms", { config: { awsPermission: "microvm:create" }, schema: { body: RunBody } }, async (req) => {
    const b = req.body;
    const tenantId = req.aws.tenantId;
    const create = {
      image: resourceName(b.imageIdentifier, tenantId, "microvm-image", "imageIdentifier", true),
      imageVersion: b.imageVersion === undefined ? undefined : parseVersion(b.imageVersion),
      idlePolicy: b.idlePolicy && {
        suspendAfterSeconds: b.idlePolicy.maxIdleDurationSeconds,
        autoResume: b.idlePolicy.autoResumeEnabled,
        terminateAfterSuspendedSeconds: b.idlePolicy.suspendedDurationSeconds,
      },
      maxRuntimeSeconds: b.maximumDurationInSeconds,
      network: b.egressNetworkConnectors === undefined ? undefined : { egressConnectors: b.egressNetworkConnectors },
      runHookPayload: b.runHookPayload,
      clientToken: b.clientToken,
    };
    try {
      return await view(await microvms.create(tenantId, create), req.aws.region);
    } catch (err) {
      // Cluster: offered to the peers as /v1 offers it (the translated request is a /v1 create), answered in AWS's shape.
      if (!(err instanceof TryPeersError) || !deps.nodeChannel) throw err;
      const answer = await deps.nodeChannel.offerCreate(err.peers, tenantId, create);
      if (!answer) throw err;
      return view(await microvms.get(tenantId, NodeChannel.createdId(answer)), req.aws.region);
    }
  });

  scope.get("/microvms/:microvmIdentifier", { config: { awsPermission: "microvm:read" }, schema: { params: Id } }, async (req) =>
    view(await microvms.get(req.aws.tenantId, vmId(req.params.microvmIdentifier, req.aws.tenantId)), req.aws.region),
  );

  scope.get(
    "/microvms",
    {
      config: { awsPermission: "microvm:read" },
      schema: {
        querystring: Type.Object(
          {
            maxResults: Type.Optional(Type.Integer({ minimum: PAGE.min, maximum: PAGE.max })),
            nextToken: Type.Optional(Type.String({ maxLength: 1024 })),
            imageIdentifier: Type.Optional(Type.String({ minLength: 1, maxLength: 2048 })),
            imageVersion: Type.Optional(Type.String({ minLength: 1, maxLength: 16 })),
          },
          { additionalProperties: false },
        ),
      },
    },
    async (req) => {
      const q = req.query;
      const tenantId = req.aws.tenantId;
      let image = q.imageIdentifier === undefined ? undefined : resourceName(q.imageIdentifier, tenantId, "microvm-image", "imageIdentifier", true);
      if (q.imageVersion !== undefined) {
        if (image === undefined) throw new ApiError("ValidationError", "imageVersion needs imageIdentifier", { field: "imageVersion" });
        // A version is one image id; a managed image has one version.
        const version = parseVersion(q.imageVersion);
        const managed = microvms.managedImages().find((m) => m.name === image);
        if (managed) image = managed.version === version ? image : "-";
        else image = deps.images ? (await deps.images.getVersion(tenantId, image, version)).id : "-";
      }
      const managed = managedNames();
      const after = decodePageToken(q.nextToken);
      const page = await microvms.list(tenantId, { image, limit: q.maxResults ?? PAGE.max, nextToken: after === undefined ? undefined : String(after) });
      return {
        items: page.items.map((row) => ({
          microvmId: row.id,
          state: awsMicroVmState(row.state as MicroVmState),
          imageArn: arnOfImage(row, req.aws.region, managed),
          imageVersion: String(row.image_version ?? 1),
          startedAt: epochSeconds(row.created_at),
        })),
        ...(page.nextToken ? { nextToken: encodePageToken(page.nextToken) } : {}),
      };
    },
  );

  scope.post("/microvms/:microvmIdentifier/suspend", { config: { awsPermission: "microvm:suspend" }, schema: { params: Id } }, async (req) => {
    await microvms.suspend(req.aws.tenantId, vmId(req.params.microvmIdentifier, req.aws.tenantId));
    return {};
  });

  scope.post("/microvms/:microvmIdentifier/resume", { config: { awsPermission: "microvm:resume" }, schema: { params: Id } }, async (req) => {
    await microvms.resume(req.aws.tenantId, vmId(req.params.microvmIdentifier, req.aws.tenantId));
    return {};
  });

  scope.delete("/microvms/:microvmIdentifier", { config: { awsPermission: "microvm:terminate" }, schema: { params: Id } }, async (req) => {
    await microvms.terminate(req.aws.tenantId, vmId(req.params.microvmIdentifier, req.aws.tenantId));
    return {};
  });

  // An auth token opens ports of the VM's endpoint, as its endpoint token (readable with microvm:read) does.
  scope.post(
    "/microvms/:microvmIdentifier/auth-token",
    {
      config: { awsPermission: "microvm:read" },
      schema: {
        params: Id,
        body: Type.Object(
          { expirationInMinutes: Type.Integer(), allowedPorts: Type.Array(PortSpecification, { minItems: 1, maxItems: 32 }) },
          { additionalProperties: false },
        ),
      },
    },
    async (req) => {
      const ports = req.body.allowedPorts.map((p) => (p.allPorts ? { allPorts: true } : p.range ? { range: p.range } : { port: p.port! })) as PortSpec[];
      const grant = await grantAccessToken(deps.accessTokens, microvms, req.aws.tenantId, vmId(req.params.microvmIdentifier, req.aws.tenantId), {
        ports,
        expiresInMinutes: req.body.expirationInMinutes,
      });
      return { authToken: { [PROXY_AUTH_HEADER]: grant.token } };
    },
  );

  // A shell token opens GET /v1/microvms/{id}/shell (a terminal): exec, as on /v1.
  scope.post(
    "/microvms/:microvmIdentifier/shell-auth-token",
    {
      config: { awsPermission: "microvm:exec" },
      schema: { params: Id, body: Type.Object({ expirationInMinutes: Type.Integer() }, { additionalProperties: false }) },
    },
    async (req) => {
      const id = vmId(req.params.microvmIdentifier, req.aws.tenantId);
      const grant = await grantShellToken(deps.shellTokens, microvms, req.aws.tenantId, id, req.body.expirationInMinutes);
      return { authToken: { [PROXY_AUTH_HEADER]: grant.token } };
    },
  );
}

const vmId = (identifier: string, tenantId: string) => resourceName(identifier, tenantId, "microvm", "microvmIdentifier");

/** The image a VM runs, as an ARN: a managed image's, or one of the tenant's images. */
function arnOfImage(row: MicroVmRow, region: string, managed: Set<string>): string {
  return managed.has(row.image_name) ? managedImageArn(region, row.image_name) : imageArn(region, row.tenant_id, row.image_name);
}

/** RunMicrovm's and GetMicrovm's answer. */
function microVmView(row: MicroVmRow, region: string, endpoint: string, managed: Set<string>) {
  return {
    microvmId: row.id,
    state: awsMicroVmState(row.state as MicroVmState),
    endpoint,
    imageArn: arnOfImage(row, region, managed),
    imageVersion: String(row.image_version ?? 1),
    maximumDurationInSeconds: row.max_runtime_seconds,
    startedAt: epochSeconds(row.created_at),
    idlePolicy: {
      maxIdleDurationSeconds: row.suspend_after_seconds,
      suspendedDurationSeconds: row.terminate_after_suspended_seconds,
      autoResumeEnabled: row.auto_resume === 1,
    },
    ...(row.terminated_at ? { terminatedAt: epochSeconds(row.terminated_at) } : {}),
    ...(row.state_reason ? { stateReason: row.state_reason } : {}),
    egressNetworkConnectors: egressConnectorsOf(row),
  };
}

/** The connectors a VM's egress came from; a policy given directly on /v1 shows as INTERNET_EGRESS or none when it is one of those. */
function egressConnectorsOf(row: MicroVmRow): string[] {
  if (row.egress_connectors) return JSON.parse(row.egress_connectors) as string[];
  return JSON.parse(row.egress) === "internet" ? [INTERNET_CONNECTOR] : [];
}
