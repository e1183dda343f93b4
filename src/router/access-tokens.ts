import { createHmac, timingSafeEqual } from "node:crypto";

/** Which guest ports a token opens. */
export type PortSelection = { all: true } | { ports: number[] } | { from: number; to: number };

export interface AccessTokenClaims {
  microVmId: string;
  ports: PortSelection;
  expiresAt: Date;
}

/** The name of the signing secret in `server_secrets` (store/secrets.ts `serverSecret`): every issuer and verifier uses it. */
export const ACCESS_TOKEN_SECRET = "endpoint-access-tokens";

/** Tokens longer than this are refused before any parsing (a real one is ~200 bytes, more with many ports). */
const MAX_TOKEN_CHARS = 4096;
const VERSION = 1;

/** The signed payload; short keys keep tokens short. */
interface Payload {
  v: number;
  /** microVmId */
  vm: string;
  /** "*" (all), a port list, or [from, to] as {r: [...]}. */
  p: "*" | number[] | { r: [number, number] };
  /** expiry, Unix seconds */
  exp: number;
}

/**
 * Endpoint access tokens limited to one VM, some of its ports and an expiry
 * (`X-aws-proxy-auth: <token>` or `Authorization: Bearer <token>`). Stateless:
 * `base64url(payload JSON) "." base64url(HMAC-SHA256(secret, payload))`, so
 * any host holding the secret verifies them without a lookup. A token cannot
 * be revoked before it expires (at most an hour, see the route); rotating the
 * secret revokes them all.
 */
export class AccessTokens {
  /** secret: ≥32 random bytes, persisted by the caller */
  constructor(private readonly secret: Buffer) {
    if (secret.length < 32) throw new Error(`an access token secret needs at least 32 bytes, got ${secret.length}`);
  }

  issue(claims: AccessTokenClaims): string {
    const p = "all" in claims.ports ? "*" : "ports" in claims.ports ? [...claims.ports.ports] : { r: [claims.ports.from, claims.ports.to] as [number, number] };
    const payload: Payload = { v: VERSION, vm: claims.microVmId, p, exp: Math.floor(claims.expiresAt.getTime() / 1000) };
    const body = Buffer.from(JSON.stringify(payload)).toString("base64url");
    return `${body}.${this.sign(body).toString("base64url")}`;
  }

  /** True only for an intact token of this secret, for `microVmId`, opening `port`, not expired at `now`. Never throws. */
  verify(token: string, microVmId: string, port: number, now: Date = new Date()): boolean {
    if (typeof token !== "string" || token.length > MAX_TOKEN_CHARS) return false;
    const dot = token.indexOf(".");
    if (dot <= 0) return false;
    const body = token.slice(0, dot);
    const signature = Buffer.from(token.slice(dot + 1), "base64url");
    const expected = this.sign(body);
    if (signature.length !== expected.length || !timingSafeEqual(signature, expected)) return false;
    let payload: Payload;
    try {
      payload = JSON.parse(Buffer.from(body, "base64url").toString()) as Payload;
    } catch {
      return false;
    }
    if (payload?.v !== VERSION || payload.vm !== microVmId || typeof payload.exp !== "number") return false;
    if (now.getTime() >= payload.exp * 1000) return false;
    return opens(payload.p, port);
  }

  private sign(body: string): Buffer {
    return createHmac("sha256", this.secret).update(`cocoon-endpoint-access:${body}`).digest();
  }
}

function opens(selection: Payload["p"], port: number): boolean {
  if (selection === "*") return true;
  if (Array.isArray(selection)) return selection.includes(port);
  const [from, to] = selection?.r ?? [];
  return typeof from === "number" && typeof to === "number" && port >= from && port <= to;
}
