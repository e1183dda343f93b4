import { Type } from "@fastify/type-provider-typebox";
import { VOLUME_LIMITS, type VolumeService, type VolumeState } from "../../lifecycle/volumes.ts";
import { ref, type VolumeView } from "../schemas.ts";
import type { Api } from "../fastify.ts";

const IdOrName = Type.Object({ volume: Type.String({ minLength: 1, maxLength: 64, description: "volume id or name" }) });

export function volumeView({ volume, attachedTo }: VolumeState): VolumeView {
  return {
    volumeId: volume.id,
    name: volume.name,
    sizeGiB: volume.size_gib,
    state: attachedTo.length > 0 ? "ATTACHED" : "AVAILABLE",
    attachedTo: attachedTo.map((a) => ({ microVmId: a.microvm_id, path: a.path, readOnly: a.read_only === 1 })),
    createdAt: volume.created_at,
  };
}

/** Persistent volumes (docs/volumes.md): a tenant's disks that outlive its microVMs, attached at create. */
export function registerVolumeRoutes(app: Api, volumes: VolumeService): void {
  app.post(
    "/v1/volumes",
    {
      config: { permission: "volume:create" },
      schema: {
        body: Type.Object(
          {
            name: Type.String({ minLength: 1, maxLength: 63, description: "unique in the tenant: [a-z0-9][a-z0-9._-]*" }),
            sizeGiB: Type.Integer({ minimum: VOLUME_LIMITS.sizeGiB.min, maximum: VOLUME_LIMITS.sizeGiB.max, description: `size in GiB (${VOLUME_LIMITS.sizeGiB.min}–${VOLUME_LIMITS.sizeGiB.max})` }),
          },
          { additionalProperties: false },
        ),
        response: { 201: ref("Volume") },
      },
    },
    async (req, reply) => reply.status(201).send(volumeView(await volumes.create(req.tenantId, req.body))),
  );
  app.get("/v1/volumes", { config: { permission: "volume:read" }, schema: { response: { 200: Type.Object({ volumes: Type.Array(ref("Volume"), { description: "by name" }) }) } } }, async (req) => ({
    volumes: (await volumes.list(req.tenantId)).map(volumeView),
  }));
  app.get("/v1/volumes/:volume", { config: { permission: "volume:read" }, schema: { params: IdOrName, response: { 200: ref("Volume") } } }, async (req) =>
    volumeView(await volumes.get(req.tenantId, req.params.volume)),
  );
  app.delete("/v1/volumes/:volume", { config: { permission: "volume:delete" }, schema: { params: IdOrName, response: { 200: ref("Volume") } } }, async (req) =>
    volumeView(await volumes.delete(req.tenantId, req.params.volume)),
  );
}
