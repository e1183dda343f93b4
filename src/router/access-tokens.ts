import { createHmac, timingSafeEqual } from "node:crypto";

/** Which guest ports a token opens. */
export type PortSelection = { all: true } | { ports: number[] } | { from: number; to: number };

export interface AccessTokenClaims {
  microVmId: string;
  ports: PortSelection;
  expiresAt: Date;
}

const PREFIX = "cat_";
/** Longer tokens are refused before any work (a selection of many single ports stays far below). */
const MAX_TOKEN_LENGTH = 8192;

/**
 * Endpoint access tokens (AWS `X-aws-proxy-auth`): a VM id, the ports it
 * opens and an expiry, signed with HMAC-SHA256 under a server secret. They
 * are not stored: a token is valid exactly while its signature checks and it
 * has not expired, on any server holding the secret.
 */
export class AccessTokens {
  /** secret: ≥32 random bytes, persisted by the caller */
  constructor(private readonly secret: Buffer) {
    if (secret.length < 32) throw new Error(`an access token secret needs at least 32 bytes, got ${secret.length}`);
  }

  issue(claims: AccessTokenClaims): string {
    const payload = Buffer.from(JSON.stringify({ id: claims.microVmId, p: claims.ports, exp: Math.floor(claims.expiresAt.getTime() / 1000) })).toString("base64url");
    return `${PREFIX}${payload}.${this.mac(payload)}`;
  }

  /** True if `token` is genuine, for this VM, not expired at `now`, and opens `port`. */
  verify(token: string, microVmId: string, port: number, now = new Date()): boolean {
    if (token.length > MAX_TOKEN_LENGTH || !token.startsWith(PREFIX)) return false;
    const [payload, mac, extra] = token.slice(PREFIX.length).split(".");
    if (!payload || !mac || extra !== undefined) return false;
    const expected = Buffer.from(this.mac(payload));
    const given = Buffer.from(mac);
    if (given.length !== expected.length || !timingSafeEqual(given, expected)) return false;
    let claims: { id?: unknown; p?: unknown; exp?: unknown };
    try {
      claims = JSON.parse(Buffer.from(payload, "base64url").toString("utf8")) as typeof claims;
    } catch {
      return false;
    }
    if (claims.id !== microVmId || typeof claims.exp !== "number" || claims.exp * 1000 <= now.getTime()) return false;
    return opens(claims.p, port);
  }

  private mac(payload: string): string {
    return createHmac("sha256", this.secret).update(payload).digest("base64url");
  }
}

function opens(selection: unknown, port: number): boolean {
  const s = selection as Partial<{ all: boolean; ports: unknown; from: unknown; to: unknown }> | null;
  if (!s || typeof s !== "object") return false;
  if (s.all === true) return true;
  if (Array.isArray(s.ports)) return s.ports.includes(port);
  return typeof s.from === "number" && typeof s.to === "number" && port >= s.from && port <= s.to;
}
