import { GetObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import { mkdir, rm, stat } from "node:fs/promises";
import { get as httpsGet } from "node:https";
import type { IncomingMessage } from "node:http";
import { join } from "node:path";
import { Readable, Transform } from "node:stream";
import { rootCertificates } from "node:tls";
import { pipeline } from "node:stream/promises";
import { fileURLToPath } from "node:url";
import { ApiError } from "../errors.ts";

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
 * Fetches `codeUri` into the staging directory: `s3://bucket/key` through the
 * S3 API (any S3-compatible store), `https://…`, or `file://…` (a server-local
 * path, admins only).
 */
export async function fetchCode(
  codeUri: string,
  opts: { stagingDir: string; maxBytes: number; admin: boolean; s3: S3Config; /** Extra trusted CA certificates (PEM) for https:// (COCOON_HTTPS_CA_FILE). */ httpsCa?: string },
): Promise<StagedCode> {
  let url: URL;
  try {
    url = new URL(codeUri);
  } catch {
    throw new ApiError("ValidationError", `codeUri ${codeUri} is not a URI (s3://bucket/key, https://… or file://…)`, { field: "codeUri" });
  }
  const fail = (what: string, err?: unknown) =>
    new ApiError("ValidationError", `cannot fetch codeUri ${codeUri}: ${what}${err ? `: ${(err as Error).message}` : ""}`, { field: "codeUri" });
  switch (url.protocol) {
    case "s3:": {
      const bucket = url.hostname;
      const key = decodeURIComponent(url.pathname.replace(/^\//, ""));
      if (!bucket || !key) throw fail("expected s3://bucket/key");
      const client = new S3Client({ endpoint: opts.s3.endpoint, region: opts.s3.region, forcePathStyle: opts.s3.forcePathStyle });
      try {
        const res = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
        if ((res.ContentLength ?? 0) > opts.maxBytes) throw new ApiError("PayloadTooLarge", `the code archive is ${res.ContentLength} bytes; the limit is ${opts.maxBytes}`, { field: "codeUri" });
        return await stageStream(res.Body as Readable, opts.stagingDir, opts.maxBytes, codeUri);
      } catch (err) {
        if (err instanceof ApiError) throw err;
        throw fail("S3 GetObject failed", err);
      } finally {
        client.destroy();
      }
    }
    case "https:": {
      let res: IncomingMessage;
      try {
        res = await httpsFetch(url, opts.httpsCa, AbortSignal.timeout(120_000));
      } catch (err) {
        throw fail("request failed", err);
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
 * GET over https with certificate verification always on, following up to 5
 * redirects (https only). `extraCa` (PEM) is trusted in addition to Node's
 * bundled roots, never instead of them.
 */
function httpsFetch(url: URL, extraCa: string | undefined, signal: AbortSignal, redirects = 5): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = httpsGet(url, { ca: extraCa ? [...rootCertificates, extraCa] : undefined, signal }, (res) => {
      const location = res.headers.location;
      if (res.statusCode && res.statusCode >= 300 && res.statusCode < 400 && location) {
        res.resume();
        const next = new URL(location, url);
        if (next.protocol !== "https:") return reject(new Error(`redirected to ${next.protocol} (only https is followed)`));
        if (redirects <= 0) return reject(new Error("too many redirects"));
        return resolve(httpsFetch(next, extraCa, signal, redirects - 1));
      }
      resolve(res);
    });
    req.on("error", reject);
  });
}
