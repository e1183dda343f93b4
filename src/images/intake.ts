import { GetObjectCommand, S3Client, S3ServiceException } from "@aws-sdk/client-s3";
import { createHash, randomBytes } from "node:crypto";
import { lookup } from "node:dns/promises";
import { createReadStream, createWriteStream } from "node:fs";
import { mkdir, rm, stat } from "node:fs/promises";
import { get as httpsGet } from "node:https";
import type { IncomingMessage } from "node:http";
import { isIP, type LookupFunction } from "node:net";
import { join } from "node:path";
import { Readable, Transform } from "node:stream";
import { rootCertificates } from "node:tls";
import { pipeline } from "node:stream/promises";
import { fileURLToPath } from "node:url";
import { ApiError, InvalidArgumentError } from "../errors.ts";
import { cidrListFromEnv, classifyAddress, inRanges, type Cidr } from "../vmm/network/addresses.ts";

/** A code archive copied to the server: where it is, its sha256 and size. */
export interface StagedCode {
  path: string;
  sha256: string;
  sizeBytes: number;
  /** "upload" or the URI it came from. */
  source: string;
}

/** S3 settings; default from COCOON_S3_ENDPOINT and the standard AWS_* environment variables. */
export interface S3Config {
  endpoint?: string;
  region?: string;
  forcePathStyle?: boolean;
}

export function s3ConfigFromEnv(env: NodeJS.ProcessEnv = process.env): S3Config {
  const endpoint = env.COCOON_S3_ENDPOINT ?? env.AWS_ENDPOINT_URL_S3 ?? env.AWS_ENDPOINT_URL;
  return {
    endpoint,
    region: env.AWS_REGION ?? env.AWS_DEFAULT_REGION ?? "us-east-1",
    // Self-hosted S3-compatible stores rarely have per-bucket DNS names.
    forcePathStyle: endpoint ? true : undefined,
  };
}

/**
 * Copies a stream to `<stagingDir>/<random>.zip`, hashing it on the way and
 * refusing (413) past `maxBytes`. The partial file is removed on failure.
 */
export async function stageStream(source: Readable, stagingDir: string, maxBytes: number, origin = "upload"): Promise<StagedCode> {
  await mkdir(stagingDir, { recursive: true });
  const path = join(stagingDir, `${randomBytes(8).toString("hex")}.zip`);
  const hash = createHash("sha256");
  let size = 0;
  const meter = new Transform({
    transform(chunk: Buffer, _enc, done) {
      size += chunk.length;
      if (size > maxBytes) return done(new ApiError("PayloadTooLarge", `the code archive exceeds the limit of ${maxBytes} bytes`, { field: "code" }));
      hash.update(chunk);
      done(null, chunk);
    },
  });
  try {
    await pipeline(source, meter, createWriteStream(path, { mode: 0o600 }));
    // @fastify/multipart truncates a file past its limit instead of failing the stream.
    if ((source as { truncated?: boolean }).truncated) throw new ApiError("PayloadTooLarge", `the code archive exceeds the limit of ${maxBytes} bytes`, { field: "code" });
  } catch (err) {
    await rm(path, { force: true });
    throw err;
  }
  return { path, sha256: hash.digest("hex"), sizeBytes: size, source: origin };
}

/**
 * Ranges code URIs may reach although they are not public
 * (COCOON_CODE_URI_PRIVATE_ALLOW: comma-separated IPv4 or IPv6 CIDRs, empty
 * by default), e.g. an internal artifact server; read at each fetch.
 */
export function codeUriPrivateAllow(env: NodeJS.ProcessEnv = process.env): Cidr[] {
  return cidrListFromEnv("COCOON_CODE_URI_PRIVATE_ALLOW", env);
}

const S3_BUCKET = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;
const hasDotSegment = (path: string) => path.split("/").some((seg) => seg === "." || seg === "..");

/**
 * Validates a tenant's `s3Allow` (the S3 locations its code URIs may name):
 * each entry is `bucket/` (the whole bucket) or `bucket/prefix`, matched as a
 * plain string prefix of `bucket/key` as S3 does (end a folder with "/").
 * Throws InvalidArgumentError naming the entry (`s3Allow[1]`).
 */
export function checkS3Allow(entries: readonly string[]): string[] {
  return entries.map((entry, i) => {
    const field = `s3Allow[${i}]`;
    const slash = entry.indexOf("/");
    const bucket = slash < 0 ? entry : entry.slice(0, slash);
    const prefix = entry.slice(slash + 1);
    if (slash < 0 || !S3_BUCKET.test(bucket)) throw new InvalidArgumentError(field, `${field}: "${entry}" must be "bucket/" or "bucket/prefix" with an S3 bucket name (3-63 of a-z, 0-9, ".", "-")`);
    if (prefix.length > 1024 || /\p{Cc}/u.test(prefix) || hasDotSegment(prefix)) throw new InvalidArgumentError(field, `${field}: the prefix must be at most 1024 characters, without control characters or . and .. segments`);
    return entry;
  });
}

/** An error whose message is safe to show the tenant as it is (no internal address or certificate name). */
class FetchRefused extends Error {}

/**
 * Fetches `codeUri` into the staging directory: `s3://bucket/key` through the
 * S3 API (any S3-compatible store), within the tenant's `s3Allow` (an empty
 * list: no s3:// at all; admins are held to their tenant's list too);
 * `https://…` from public addresses only (every redirect re-checked, and the
 * connection made to the address that was checked), or inside
 * `privateAllow`; `file://…` (a server-local path) for admins only.
 */
export async function fetchCode(
  codeUri: string,
  opts: {
    stagingDir: string;
    maxBytes: number;
    admin: boolean;
    s3: S3Config;
    /** The tenant's S3 locations ("bucket/prefix"); default none. */
    s3Allow?: readonly string[];
    /** Extra trusted CA certificates (PEM) for https:// (COCOON_HTTPS_CA_FILE). */
    httpsCa?: string;
    /** Non-public ranges https:// may reach (default `codeUriPrivateAllow()`). */
    privateAllow?: readonly Cidr[];
  },
): Promise<StagedCode> {
  let url: URL;
  try {
    url = new URL(codeUri);
  } catch {
    throw new ApiError("ValidationError", `codeUri ${codeUri} is not a URI (s3://bucket/key, https://… or file://…)`, { field: "codeUri" });
  }
  const fail = (what: string) => new ApiError("ValidationError", `cannot fetch codeUri ${codeUri}: ${what}`, { field: "codeUri" });
  switch (url.protocol) {
    case "s3:": {
      const bucket = url.hostname;
      let key: string;
      try {
        key = decodeURIComponent(url.pathname.replace(/^\//, ""));
      } catch {
        throw fail("the key is not valid percent-encoding");
      }
      if (!S3_BUCKET.test(bucket) || !key || url.port || url.username || url.password || url.search || url.hash) throw fail("expected s3://bucket/key");
      if (hasDotSegment(key)) throw fail("a key with . or .. segments is not accepted");
      const location = `${bucket}/${key}`;
      if (!(opts.s3Allow ?? []).some((prefix) => location.startsWith(prefix))) {
        throw new ApiError("Forbidden", `codeUri ${codeUri} is outside the S3 buckets and prefixes this tenant may read (its s3Allow, set by an admin)`, { field: "codeUri" });
      }
      const client = new S3Client({ endpoint: opts.s3.endpoint, region: opts.s3.region, forcePathStyle: opts.s3.forcePathStyle });
      try {
        const res = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
        if ((res.ContentLength ?? 0) > opts.maxBytes) throw new ApiError("PayloadTooLarge", `the code archive is ${res.ContentLength} bytes; the limit is ${opts.maxBytes}`, { field: "codeUri" });
        return await stageStream(res.Body as Readable, opts.stagingDir, opts.maxBytes, codeUri);
      } catch (err) {
        if (err instanceof ApiError) throw err;
        throw fail(`S3 GetObject failed: ${err instanceof S3ServiceException ? err.name : networkFailure(err as NodeJS.ErrnoException)}`);
      } finally {
        client.destroy();
      }
    }
    case "https:": {
      let res: IncomingMessage;
      try {
        res = await httpsFetch(url, { extraCa: opts.httpsCa, privateAllow: opts.privateAllow ?? codeUriPrivateAllow(), signal: AbortSignal.timeout(120_000) });
      } catch (err) {
        throw fail(err instanceof FetchRefused ? err.message : `request failed: ${networkFailure(err as NodeJS.ErrnoException)}`);
      }
      if (res.statusCode !== 200) {
        res.resume();
        throw fail(`the server answered ${res.statusCode}`);
      }
      const length = Number(res.headers["content-length"] ?? 0);
      if (length > opts.maxBytes) {
        res.destroy();
        throw new ApiError("PayloadTooLarge", `the code archive is ${length} bytes; the limit is ${opts.maxBytes}`, { field: "codeUri" });
      }
      return stageStream(res, opts.stagingDir, opts.maxBytes, codeUri);
    }
    case "file:": {
      if (!opts.admin) throw new ApiError("Forbidden", "file:// code URIs are for admin keys only", { field: "codeUri" });
      const path = fileURLToPath(url);
      const st = await stat(path).catch(() => undefined);
      if (!st?.isFile()) throw fail("no such file");
      return stageStream(createReadStream(path), opts.stagingDir, opts.maxBytes, codeUri);
    }
    default:
      throw new ApiError("ValidationError", `codeUri scheme ${url.protocol} is not supported (s3://, https://, file://)`, { field: "codeUri" });
  }
}

/**
 * The addresses to connect to for `url`: its host resolved here (or the
 * literal address), refused unless every address is public or inside
 * `privateAllow`. The messages name no address.
 */
async function vetHost(url: URL, privateAllow: readonly Cidr[]): Promise<{ address: string; family: number }[]> {
  const host = url.hostname.replace(/^\[(.*)\]$/, "$1");
  const addresses = isIP(host)
    ? [{ address: host, family: isIP(host) }]
    : await lookup(host, { all: true, verbatim: true }).catch(() => {
        throw new FetchRefused("the host name does not resolve");
      });
  if (addresses.length === 0) throw new FetchRefused("the host name does not resolve");
  for (const a of addresses) {
    if (classifyAddress(a.address) && !inRanges(a.address, privateAllow)) throw new FetchRefused("refused: the address is not public");
  }
  return addresses;
}

/**
 * GET over https with certificate verification always on (for the URL's
 * host name), following up to 5 redirects (https only), each host vetted by
 * `vetHost` and connected to at a vetted address (a `lookup` that returns
 * only those: no second resolution between the check and the connect), on a
 * connection of its own. `extraCa` (PEM) is trusted in addition to Node's
 * bundled roots, never instead of them.
 */
async function httpsFetch(url: URL, o: { extraCa?: string; privateAllow: readonly Cidr[]; signal: AbortSignal }, redirects = 5): Promise<IncomingMessage> {
  const vetted = await vetHost(url, o.privateAllow);
  const pinned: LookupFunction = (_host, options, callback) => {
    if (options.all) (callback as unknown as (err: null, all: { address: string; family: number }[]) => void)(null, vetted);
    else callback(null, vetted[0]!.address, vetted[0]!.family);
  };
  const res = await new Promise<IncomingMessage>((resolve, reject) => {
    const req = httpsGet(url, { ca: o.extraCa ? [...rootCertificates, o.extraCa] : undefined, signal: o.signal, lookup: pinned, agent: false }, resolve);
    req.on("error", reject);
  });
  const location = res.headers.location;
  if (!res.statusCode || res.statusCode < 300 || res.statusCode >= 400 || !location) return res;
  res.resume();
  let next: URL;
  try {
    next = new URL(location, url);
  } catch {
    throw new FetchRefused("redirected to something that is not a URL");
  }
  if (next.protocol !== "https:") throw new FetchRefused(`redirected to ${next.protocol} (only https is followed)`);
  if (redirects <= 0) throw new FetchRefused("too many redirects");
  return httpsFetch(next, o, redirects - 1);
}

/** A network or TLS failure in words that name no address or certificate field (Node's own messages do). */
function networkFailure(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case "DEPTH_ZERO_SELF_SIGNED_CERT":
    case "SELF_SIGNED_CERT_IN_CHAIN":
      return "self-signed certificate";
    case "ERR_TLS_CERT_ALTNAME_INVALID":
      return "the certificate is not valid for this host name";
    case "CERT_HAS_EXPIRED":
      return "the certificate has expired";
    case "UNABLE_TO_VERIFY_LEAF_SIGNATURE":
    case "UNABLE_TO_GET_ISSUER_CERT":
    case "UNABLE_TO_GET_ISSUER_CERT_LOCALLY":
      return "the certificate is not signed by a trusted authority";
    case "ECONNREFUSED":
      return "connection refused";
    case "ECONNRESET":
      return "connection reset";
    case "ETIMEDOUT":
    case "ABORT_ERR":
      return "timed out";
    case "EHOSTUNREACH":
    case "ENETUNREACH":
      return "host unreachable";
    default:
      return err.name === "TimeoutError" ? "timed out" : /^[A-Z_]+$/.test(err.code ?? "") ? err.code! : "connection failed";
  }
}
