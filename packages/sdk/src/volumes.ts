import type { CallOpts, Transport } from "./http.ts";
import type { CreateVolumeOpts, VolumeInfo } from "./types.ts";

/**
 * `client.volumes`: persistent volumes, disks that outlive the microVMs they
 * are attached to (`microvms.create({volumes: [{name, path, readOnly}]})`).
 */
export class Volumes {
  /** @internal */
  constructor(private readonly http: Transport) {}

  /** Creates an empty volume (ext4, `sizeGiB` 1–32). @throws ConflictError if the name is taken, QuotaExceededError past the tenant's quotas. */
  create(opts: CreateVolumeOpts, call?: CallOpts): Promise<VolumeInfo> {
    return this.http.json<VolumeInfo>({ method: "POST", path: "/v1/volumes", json: opts }, call);
  }

  /** The tenant's volumes, by name, with the microVMs holding each. */
  async list(call?: CallOpts): Promise<VolumeInfo[]> {
    return (await this.http.json<{ volumes: VolumeInfo[] }>({ method: "GET", path: "/v1/volumes" }, call)).volumes;
  }

  /** A volume by id or name. @throws NotFoundError */
  get(idOrName: string, call?: CallOpts): Promise<VolumeInfo> {
    return this.http.json<VolumeInfo>({ method: "GET", path: `/v1/volumes/${encodeURIComponent(idOrName)}` }, call);
  }

  /** Deletes a volume and its data. @throws ConflictError while a microVM that is neither TERMINATED nor FAILED holds it. */
  delete(idOrName: string, call?: CallOpts): Promise<VolumeInfo> {
    return this.http.json<VolumeInfo>({ method: "DELETE", path: `/v1/volumes/${encodeURIComponent(idOrName)}` }, call);
  }
}
