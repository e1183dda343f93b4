import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto";
import { mkdir, readFile } from "node:fs/promises";
import { dirname } from "node:path";
import { ApiError } from "../../errors.ts";
import type { Db } from "../../store/db.ts";
import type { RegistryCredentialsRow } from "../../store/schema.ts";
import { writeFileAtomic } from "../../util/files.ts";
import { normalizeRegistryHost } from "./reference.ts";

/** What the API shows of stored credentials: never the password. */
export interface RegistryCredentialsView {
  host: string;
  username: string;
  createdAt: string;
  updatedAt: string;
}

/** Docker's auth file (`--authfile`): `{"auths": {host: {"auth": base64(user:password)}}}`. */
export interface AuthFile {
  auths: Record<string, { auth: string }>;
}

const LIMITS = { username: 256, password: 8192, perTenant: 64 } as const;

/**
 * Per-tenant registry credentials (PUT /v1/registries/{host}). Passwords are
 * sealed with AES-256-GCM under a key of the server's own (a 0600 file beside
 * the database, made on first use), with the tenant and host as associated
 * data: a copy of the database alone reveals no password, and a sealed
 * password moved to another tenant's or host's row does not open. The API
 * never returns a password; it is opened only to write a build's auth file.
 */
export class RegistryCredentials {
  private key: Promise<Buffer> | undefined;

  constructor(
    private readonly db: Db,
    private readonly keyFile: string,
  ) {}

  /** The host as stored, or a 400 naming the field. */
  static host(raw: string): string {
    const host = normalizeRegistryHost(raw);
    if (!host) throw new ApiError("ValidationError", `host must be a registry host[:port] such as ghcr.io or registry.example.com:5000, got "${raw.slice(0, 100)}"`, { field: "host" });
    return host;
  }

  async put(tenantId: string, rawHost: string, username: string, password: string): Promise<RegistryCredentialsView> {
    const host = RegistryCredentials.host(rawHost);
    if (!username || username.length > LIMITS.username || /[:\0\n]/.test(username)) {
      throw new ApiError("ValidationError", `username must be 1 to ${LIMITS.username} characters without ":", NUL or newlines`, { field: "username" });
    }
    if (!password || password.length > LIMITS.password || /[\0\n]/.test(password)) {
      throw new ApiError("ValidationError", `password must be 1 to ${LIMITS.password} characters without NUL or newlines`, { field: "password" });
    }
    const now = new Date().toISOString();
    const sealed = await this.seal(tenantId, host, password);
    const existing = await this.row(tenantId, host);
    if (existing) {
      await this.db.updateTable("registry_credentials").set({ username, password_sealed: sealed, updated_at: now }).where("tenant_id", "=", tenantId).where("host", "=", host).execute();
      return view({ ...existing, username, updated_at: now });
    }
    const count = await this.db.selectFrom("registry_credentials").select((eb) => eb.fn.countAll<number>().as("n")).where("tenant_id", "=", tenantId).executeTakeFirst();
    if (Number(count?.n ?? 0) >= LIMITS.perTenant) throw new ApiError("RateLimited", `a tenant stores credentials for at most ${LIMITS.perTenant} registries`, { field: "host" });
    const row: RegistryCredentialsRow = { tenant_id: tenantId, host, username, password_sealed: sealed, created_at: now, updated_at: now };
    await this.db.insertInto("registry_credentials").values(row).execute();
    return view(row);
  }

  async list(tenantId: string): Promise<RegistryCredentialsView[]> {
    const rows = await this.db.selectFrom("registry_credentials").selectAll().where("tenant_id", "=", tenantId).orderBy("host").execute();
    return rows.map(view);
  }

  async get(tenantId: string, rawHost: string): Promise<RegistryCredentialsView> {
    const row = await this.row(tenantId, RegistryCredentials.host(rawHost));
    if (!row) throw new ApiError("NotFound", `no credentials for registry ${rawHost}`);
    return view(row);
  }

  async delete(tenantId: string, rawHost: string): Promise<void> {
    const host = RegistryCredentials.host(rawHost);
    const res = await this.db.deleteFrom("registry_credentials").where("tenant_id", "=", tenantId).where("host", "=", host).executeTakeFirst();
    if (Number(res.numDeletedRows) === 0) throw new ApiError("NotFound", `no credentials for registry ${rawHost}`);
  }

  /** Whether the tenant has credentials for `host` (to word an authentication failure). */
  async has(tenantId: string, host: string): Promise<boolean> {
    return (await this.row(tenantId, host)) !== undefined;
  }

  /** The tenant's credentials for these registries as an auth file (only theirs: nothing of the server's or another tenant's). */
  async authFile(tenantId: string, hosts: string[]): Promise<AuthFile> {
    const auths: AuthFile["auths"] = {};
    if (hosts.length === 0) return { auths };
    const rows = await this.db.selectFrom("registry_credentials").selectAll().where("tenant_id", "=", tenantId).where("host", "in", hosts).execute();
    for (const row of rows) {
      const password = await this.open(row);
      auths[row.host] = { auth: Buffer.from(`${row.username}:${password}`).toString("base64") };
    }
    return { auths };
  }

  private row(tenantId: string, host: string): Promise<RegistryCredentialsRow | undefined> {
    return this.db.selectFrom("registry_credentials").selectAll().where("tenant_id", "=", tenantId).where("host", "=", host).executeTakeFirst();
  }

  private async seal(tenantId: string, host: string, password: string): Promise<string> {
    const iv = randomBytes(12);
    const cipher = createCipheriv("aes-256-gcm", await this.secret(), iv);
    cipher.setAAD(Buffer.from(`${tenantId}\0${host}`));
    const data = Buffer.concat([cipher.update(password, "utf8"), cipher.final()]);
    return ["v1", iv, cipher.getAuthTag(), data].map((p) => (typeof p === "string" ? p : p.toString("base64url"))).join(".");
  }

  private async open(row: RegistryCredentialsRow): Promise<string> {
    const [version, iv, tag, data] = row.password_sealed.split(".");
    if (version !== "v1" || !iv || !tag || data === undefined) throw new Error(`registry credentials for ${row.host} are not in a known format`);
    const decipher = createDecipheriv("aes-256-gcm", await this.secret(), Buffer.from(iv, "base64url"));
    decipher.setAAD(Buffer.from(`${row.tenant_id}\0${row.host}`));
    decipher.setAuthTag(Buffer.from(tag, "base64url"));
    try {
      return Buffer.concat([decipher.update(Buffer.from(data, "base64url")), decipher.final()]).toString("utf8");
    } catch {
      throw new Error(`registry credentials for ${row.host} do not open with this server's key (${this.keyFile}): store them again`);
    }
  }

  /** The 32-byte key, made on first use. */
  private secret(): Promise<Buffer> {
    this.key ??= (async () => {
      const existing = await readFile(this.keyFile).catch((err: NodeJS.ErrnoException) => {
        if (err.code === "ENOENT") return undefined;
        throw err;
      });
      if (existing) {
        if (existing.length !== 32) throw new Error(`${this.keyFile} must hold 32 bytes`);
        return existing;
      }
      const key = randomBytes(32);
      await mkdir(dirname(this.keyFile), { recursive: true });
      await writeFileAtomic(this.keyFile, key, 0o600);
      return key;
    })();
    this.key.catch(() => (this.key = undefined));
    return this.key;
  }
}

function view(row: RegistryCredentialsRow): RegistryCredentialsView {
  return { host: row.host, username: row.username, createdAt: row.created_at, updatedAt: row.updated_at };
}
