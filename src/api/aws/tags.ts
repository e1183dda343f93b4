import { Type } from "@fastify/type-provider-typebox";
import { ApiError } from "../../errors.ts";
import { listTags, tagResource, untagResource, type TaggedResource } from "../../store/tags.ts";
import { requirePermission, type AwsApiDeps, type AwsScope } from "./scope.ts";
import type { AwsCaller } from "./sigv4.ts";
import { accountOf, parseArn } from "./protocol.ts";
import { Tags } from "./shapes.ts";

const Resource = Type.Object({ Resource: Type.String({ minLength: 1, maxLength: 2048 }) });

/**
 * TagResource, UntagResource, ListTags (under `/2017-03-31/tags/{ARN}`, as
 * the client sends them): tags of a microVM (by id) or an image (by name).
 * Tagging needs the permission that creates the resource, listing the read one.
 */
export function registerTagOperations(scope: AwsScope, deps: AwsApiDeps): void {
  /** The tagged resource an ARN names, after checking it exists in the caller's tenant and the key may act on it. */
  const resolve = async (caller: AwsCaller, arnText: string, action: "read" | "create"): Promise<TaggedResource> => {
    const arn = parseArn(arnText);
    if (!arn || (arn.type !== "microvm" && arn.type !== "microvm-image")) {
      throw new ApiError("ValidationError", `Resource ${arnText} is not a microvm or microvm-image ARN`, { field: "Resource" });
    }
    const resource: TaggedResource = { type: arn.type, id: arn.id };
    if (arn.account !== accountOf(caller.tenantId)) throw new ApiError("NotFound", `${arn.type} ${arnText} not found`, { resourceId: arnText, resourceType: arn.type });
    if (arn.type === "microvm") {
      requirePermission(caller, `microvm:${action}`);
      await deps.microvms.get(caller.tenantId, arn.id);
    } else {
      requirePermission(caller, `image:${action}`);
      if (!deps.images) throw new ApiError("NotFound", `microvm-image ${arnText} not found`);
      const image = await deps.images.get(caller.tenantId, arn.id);
      if (image.name !== arn.id) throw new ApiError("NotFound", `microvm-image ${arnText} not found`);
    }
    return resource;
  };

  scope.get("/tags/:Resource", { schema: { params: Resource } }, async (req) => ({ Tags: await listTags(deps.db, req.aws.tenantId, await resolve(req.aws, req.params.Resource, "read")) }));

  scope.post("/tags/:Resource", { schema: { params: Resource, body: Type.Object({ Tags }, { additionalProperties: false }) } }, async (req, reply) => {
    await tagResource(deps.db, req.aws.tenantId, await resolve(req.aws, req.params.Resource, "create"), req.body.Tags);
    return reply.status(204).send();
  });

  scope.delete(
    "/tags/:Resource",
    {
      schema: {
        params: Resource,
        querystring: Type.Object({ tagKeys: Type.Union([Type.String({ maxLength: 128 }), Type.Array(Type.String({ maxLength: 128 }), { maxItems: 64 })]) }, { additionalProperties: false }),
      },
    },
    async (req, reply) => {
      await untagResource(deps.db, req.aws.tenantId, await resolve(req.aws, req.params.Resource, "create"), [req.query.tagKeys].flat());
      return reply.status(204).send();
    },
  );
}
