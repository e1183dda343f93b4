import { Type } from "@fastify/type-provider-typebox";

/**
 * Request shapes several operations share, as the client's model defines
 * them (dist-types/models). Unions (`Logging`, `CodeArtifact`) take exactly
 * one member.
 */

export const Logging = Type.Object(
  {
    disabled: Type.Optional(Type.Object({}, { additionalProperties: false })),
    cloudWatch: Type.Optional(
      Type.Object({ logGroup: Type.Optional(Type.String({ maxLength: 512 })), logStream: Type.Optional(Type.String({ maxLength: 512 })) }, { additionalProperties: false }),
    ),
  },
  { additionalProperties: false, minProperties: 1, maxProperties: 1 },
);

export const CodeArtifact = Type.Object({ uri: Type.String({ minLength: 1, maxLength: 4096 }) }, { additionalProperties: false, minProperties: 1, maxProperties: 1 });

const HookState = Type.Union([Type.Literal("ENABLED"), Type.Literal("DISABLED")]);
const HookTimeout = Type.Integer({ minimum: 1, maximum: 60 });

export const Hooks = Type.Object(
  {
    port: Type.Optional(Type.Integer({ minimum: 1, maximum: 65_535 })),
    microvmHooks: Type.Optional(
      Type.Object(
        {
          run: Type.Optional(HookState),
          runTimeoutInSeconds: Type.Optional(HookTimeout),
          resume: Type.Optional(HookState),
          resumeTimeoutInSeconds: Type.Optional(HookTimeout),
          suspend: Type.Optional(HookState),
          suspendTimeoutInSeconds: Type.Optional(HookTimeout),
          terminate: Type.Optional(HookState),
          terminateTimeoutInSeconds: Type.Optional(HookTimeout),
        },
        { additionalProperties: false },
      ),
    ),
    microvmImageHooks: Type.Optional(
      Type.Object(
        {
          ready: Type.Optional(HookState),
          readyTimeoutInSeconds: Type.Optional(HookTimeout),
          validate: Type.Optional(HookState),
          validateTimeoutInSeconds: Type.Optional(HookTimeout),
        },
        { additionalProperties: false },
      ),
    ),
  },
  { additionalProperties: false },
);

/** Up to 50 tags (the per-resource quota is checked by the core, as ServiceQuotaExceeded). */
export const Tags = Type.Record(Type.String({ maxLength: 256 }), Type.String({ maxLength: 1024 }), { maxProperties: 64 });

export const EnvironmentVariables = Type.Record(Type.String({ pattern: "^[A-Za-z_][A-Za-z0-9_]*$", maxLength: 256 }), Type.String({ maxLength: 32_768 }), { maxProperties: 256 });
