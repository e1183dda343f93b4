/** What every operation module of the AWS door is given: its dependencies, its Fastify scope, the permission check. */
import type { TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import type { FastifyBaseLogger, FastifyInstance, RawReplyDefaultExpression, RawRequestDefaultExpression, RawServerDefault } from "fastify";
import { ApiError } from "../../errors.ts";
import type { ImageService } from "../../images/service.ts";
import type { MicroVmService } from "../../lifecycle/microvms.ts";
import type { AccessTokens } from "../../router/access-tokens.ts";
import type { NodeChannel } from "../../router/node-channel.ts";
import type { Db } from "../../store/db.ts";
import type { ServerSecrets } from "../../store/secrets.ts";
import { grants } from "../auth.ts";
import type { AwsCaller } from "./sigv4.ts";

export interface AwsApiDeps {
  db: Db;
  secrets: ServerSecrets;
  microvms: MicroVmService;
  /** Without it (no image builds), the image operations answer for managed images only. */
  images?: ImageService;
  accessTokens: AccessTokens;
  shellTokens: AccessTokens;
  /** The VM's endpoint URL (`http://{id}.{domain}:{port}/`). */
  endpointUrl: (id: string) => string;
  /** Cluster: RunMicrovm this node has no room for is offered to its peers over it. */
  nodeChannel?: NodeChannel;
}

/** A Fastify scope of the AWS door, with the typed schemas of TypeBox. */
export type AwsScope = FastifyInstance<RawServerDefault, RawRequestDefaultExpression, RawReplyDefaultExpression, FastifyBaseLogger, TypeBoxTypeProvider>;

/** The key's permissions apply exactly as on `/v1` (api/auth.ts `grants`). */
export function requirePermission(caller: AwsCaller, permission: string): void {
  if (!grants(caller.permissions, permission)) throw new ApiError("Forbidden", `this key lacks the ${permission} permission`, { permission });
}

declare module "fastify" {
  interface FastifyRequest {
    /** The SigV4 signer of a request to the AWS door. */
    aws: AwsCaller;
  }
  interface FastifyContextConfig {
    /** Permission an AWS operation needs, checked once its signature is. */
    awsPermission?: string;
  }
}
