import type { CallOpts, Transport } from "./http.ts";
import type { CreateKeyOpts, CreatedKey, KeyInfo, TenantInfo } from "./types.ts";

/** `client.keys` (admin key only): API keys of every tenant. */
export class Keys {
  /** @internal */
  constructor(private readonly http: Transport) {}

  /** Creates a key for a tenant; `apiKey`, the secret, is returned this once. @throws NotFoundError for an unknown tenant. */
  create(opts: CreateKeyOpts, call?: CallOpts): Promise<CreatedKey> {
    return this.http.json<CreatedKey>({ method: "POST", path: "/v1/keys", json: opts }, call);
  }

  /** All keys, revoked ones included (with `revokedAt`); never their secrets. */
  async list(call?: CallOpts): Promise<KeyInfo[]> {
    return (await this.http.json<{ keys: KeyInfo[] }>({ method: "GET", path: "/v1/keys" }, call)).keys;
  }

  /** Revokes a key; effective on the next request made with it. @throws NotFoundError for an unknown key. */
  async revoke(keyId: string, call?: CallOpts): Promise<void> {
    await this.http.json({ method: "DELETE", path: `/v1/keys/${encodeURIComponent(keyId)}` }, call);
  }
}

/** `client.tenants` (admin key only). */
export class Tenants {
  /** @internal */
  constructor(private readonly http: Transport) {}

  /** Creates a tenant; names are 1–64 of `A-Za-z0-9._-`. @throws ConflictError if the name is taken. */
  create(opts: { name: string }, call?: CallOpts): Promise<TenantInfo> {
    return this.http.json<TenantInfo>({ method: "POST", path: "/v1/tenants", json: { name: opts.name } }, call);
  }
}
