import { Sha256 } from "@smithy/core/checksum";
import { HttpRequest } from "@smithy/core/protocols";
import { SignatureV4 } from "@smithy/signature-v4";
import { createHash, timingSafeEqual } from "node:crypto";
import type { IncomingHttpHeaders } from "node:http";
import type { Db } from "../../store/db.ts";
import type { ServerSecrets } from "../../store/secrets.ts";
import { findLiveKeyById } from "../../store/tenants.ts";
import { AwsError } from "./errors.ts";

/** The signing name the AWS SDK uses for Lambda MicroVMs. */
const SIGNING_SERVICE = "lambda";
/** A signature older (or further in the future) than this is refused, as AWS does. */
const MAX_CLOCK_SKEW_MS = 5 * 60_000;

/** Who signed a request: the key, its tenant and permissions, and the region it signed for. */
export interface AwsCaller {
  keyId: string;
  tenantId: string;
  permissions: string[];
  /** The region of the credential scope; ARNs in answers use it (any region is accepted). */
  region: string;
}

const AUTH = /^AWS4-HMAC-SHA256 Credential=([^/\s,]+)\/(\d{8})\/([a-z0-9-]{1,32})\/([a-z0-9-]{1,32})\/aws4_request,\s*SignedHeaders=([a-z0-9;_.-]+),\s*Signature=([0-9a-f]{64})$/;

/**
 * Verifies a SigV4-signed request as the AWS SDK signs it: `accessKeyId` is a
 * Cocoon key id, `secretAccessKey` that key's secret. The canonical request is
 * signed again with the key's secret (unsealed with the master key) by
 * `@smithy/signature-v4` and the signatures are compared in constant time.
 * Every failure is a 403 of the type AWS answers.
 */
export async function verifySigV4(
  db: Db,
  secrets: ServerSecrets,
  req: { method: string; url: string; headers: IncomingHttpHeaders; body: Buffer },
  now = new Date(),
): Promise<AwsCaller> {
  const authorization = req.headers.authorization;
  if (!authorization) throw new AwsError("MissingAuthenticationTokenException", 403, "Missing Authentication Token: sign the request with SigV4 (accessKeyId = a Cocoon key id, secretAccessKey = its secret)");
  const m = AUTH.exec(authorization);
  if (!m) throw new AwsError("IncompleteSignatureException", 403, "the Authorization header is not a SigV4 (AWS4-HMAC-SHA256) signature with Credential, SignedHeaders and Signature");
  const [, keyId, scopeDate, region, service, signedHeaderList, signature] = m as unknown as [string, string, string, string, string, string, string];
  if (service !== SIGNING_SERVICE) throw new AwsError("InvalidSignatureException", 403, `Credential should be scoped to correct service: '${SIGNING_SERVICE}'`);

  const key = await findLiveKeyById(db, keyId);
  if (!key) throw new AwsError("UnrecognizedClientException", 403, "The security token included in the request is invalid: no live key with this access key id");
  if (!key.secret_sealed) throw new AwsError("UnrecognizedClientException", 403, `key ${keyId} was created before SigV4 support and cannot sign requests: create a new key`);

  const amzDate = header(req.headers, "x-amz-date");
  const signedAt = amzDate ? parseAmzDate(amzDate) : undefined;
  if (!signedAt) throw new AwsError("IncompleteSignatureException", 403, "the request needs an X-Amz-Date header (YYYYMMDD'T'HHMMSS'Z')");
  if (amzDate!.slice(0, 8) !== scopeDate) throw new AwsError("InvalidSignatureException", 403, `the credential scope date ${scopeDate} does not match X-Amz-Date ${amzDate}`);
  const skew = signedAt.getTime() - now.getTime();
  if (skew < -MAX_CLOCK_SKEW_MS) throw new AwsError("InvalidSignatureException", 403, `Signature expired: ${amzDate} is now earlier than ${formatAmzDate(new Date(now.getTime() - MAX_CLOCK_SKEW_MS))} (${formatAmzDate(now)} - 5 min.)`);
  if (skew > MAX_CLOCK_SKEW_MS) throw new AwsError("InvalidSignatureException", 403, `Signature not yet current: ${amzDate} is still later than ${formatAmzDate(new Date(now.getTime() + MAX_CLOCK_SKEW_MS))} (${formatAmzDate(now)} + 5 min.)`);

  const signedHeaders = signedHeaderList.split(";");
  if (!signedHeaders.includes("host")) throw new AwsError("IncompleteSignatureException", 403, "SignedHeaders must include host");
  const headers: Record<string, string> = {};
  for (const name of signedHeaders) {
    const value = header(req.headers, name);
    if (value === undefined) throw new AwsError("IncompleteSignatureException", 403, `signed header ${name} is missing from the request`);
    headers[name] = value;
  }
  // A signed payload hash must be the body's: otherwise a captured request could carry another body.
  const payloadHash = createHash("sha256").update(req.body).digest("hex");
  const claimedHash = headers["x-amz-content-sha256"] ?? header(req.headers, "x-amz-content-sha256");
  if (claimedHash !== undefined && claimedHash !== payloadHash) throw new AwsError("InvalidSignatureException", 403, "X-Amz-Content-SHA256 does not match the request body (unsigned payloads are not accepted)");

  const [path, rawQuery] = splitUrl(req.url);
  const request = new HttpRequest({ method: req.method, protocol: "http:", hostname: headers.host!, path, query: parseQuery(rawQuery), headers, body: req.body.length ? req.body : undefined });
  let secretAccessKey: string;
  try {
    secretAccessKey = secrets.unseal(key.secret_sealed, key.id);
  } catch {
    throw new AwsError("UnrecognizedClientException", 403, `key ${keyId}'s secret cannot be unsealed with this server's master key`);
  }
  const signer = new SignatureV4({ credentials: { accessKeyId: keyId, secretAccessKey }, region, service: SIGNING_SERVICE, sha256: Sha256, uriEscapePath: true, applyChecksum: false });
  const signed = await signer.sign(request, { signingDate: signedAt, signableHeaders: new Set(signedHeaders) });
  const expected = /Signature=([0-9a-f]{64})$/.exec(String(signed.headers.authorization ?? ""))?.[1] ?? "";
  if (!timingSafeEqual(Buffer.from(expected.padEnd(64, "0")), Buffer.from(signature))) {
    throw new AwsError("InvalidSignatureException", 403, "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.");
  }
  return { keyId: key.id, tenantId: key.tenant_id, permissions: JSON.parse(key.permissions) as string[], region };
}

function header(headers: IncomingHttpHeaders, name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v.join(",") : v;
}

function parseAmzDate(value: string): Date | undefined {
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(value);
  if (!m) return undefined;
  const d = new Date(Date.UTC(+m[1]!, +m[2]! - 1, +m[3]!, +m[4]!, +m[5]!, +m[6]!));
  return Number.isNaN(d.getTime()) ? undefined : d;
}

const formatAmzDate = (d: Date) => d.toISOString().replace(/[-:]/g, "").replace(/\.\d{3}/, "");

function splitUrl(url: string): [string, string] {
  const q = url.indexOf("?");
  return q < 0 ? [url, ""] : [url.slice(0, q), url.slice(q + 1)];
}

/** Decoded query parameters (repeated keys become arrays); the signer encodes them canonically again. */
function parseQuery(raw: string): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const part of raw.split("&")) {
    if (!part) continue;
    const eq = part.indexOf("=");
    const k = decode(eq < 0 ? part : part.slice(0, eq));
    const v = eq < 0 ? "" : decode(part.slice(eq + 1));
    const prev = out[k];
    out[k] = prev === undefined ? v : [...[prev].flat(), v];
  }
  return out;
}

function decode(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw new AwsError("IncompleteSignatureException", 403, "the query string is not valid percent-encoding");
  }
}
