/**
 * The Fastify instance every route registers on: its limits, its request
 * log (credentials redacted), and the error envelope every answer of an
 * error takes. Routes take `Api` and `errorBody` from here, and server.ts
 * builds the API on it, so the dependencies point one way.
 */
import type { TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import Fastify, { type FastifyError, type FastifyReply, type FastifyRequest } from "fastify";
import type { IncomingMessage } from "node:http";
import { randomUUID } from "node:crypto";
import type { Socket } from "node:net";
import type { Writable } from "node:stream";
import { ERROR_CODES, type ErrorCode } from "../errors.ts";
import { toApiError } from "./error-mapping.ts";

/** JSON and text bodies; file uploads stream and have their own limit (routes/microvms.ts). */
export const BODY_LIMIT_BYTES = 1024 * 1024;

/**
 * How long a client may take to send a request (slow-loris uploads end
 * there). Headers must be complete within `headersMs`; the whole request,
 * body included, within `requestMs` (uploads larger than that needs at the
 * client's rate are cut: 15 min is 9 MB/s for the 8 GiB upload limit).
 * Answers may take as long as they take (a long exec, a WebSocket).
 */
export interface ApiTimeouts {
  headersMs: number;
  requestMs: number;
}
export const DEFAULT_TIMEOUTS: ApiTimeouts = { headersMs: 30_000, requestMs: 15 * 60_000 };

/** Query parameters that carry credentials: logged as [REDACTED]. */
const SECRET_PARAMS = new Set(["access_token", "cocoon_token", "ticket", "token"]);
/** Headers that carry credentials, wherever a log line holds request headers. */
const SECRET_HEADERS = ["authorization", "cookie", "x-aws-proxy-auth", "proxy-authorization"];

export function createFastify(deps: { logger?: boolean; logStream?: Writable; timeouts?: Partial<ApiTimeouts> }) {
  const timeouts = { ...DEFAULT_TIMEOUTS, ...deps.timeouts };
  return Fastify({
    logger: deps.logger
      ? {
          level: "info",
          ...(deps.logStream ? { stream: deps.logStream } : {}),
          serializers: { req: (req: FastifyRequest) => ({ method: req.method, url: redactUrl(req.url), host: req.host, remoteAddress: req.ip }) },
          redact: { paths: SECRET_HEADERS.flatMap((h) => [`req.headers["${h}"]`, `headers["${h}"]`]), censor: "[REDACTED]" },
        }
      : false,
    bodyLimit: BODY_LIMIT_BYTES,
    // A client's x-request-id names its request in our log if it is a plain token; anything else gets our own.
    genReqId: (req: IncomingMessage) => {
      const id = req.headers["x-request-id"];
      return typeof id === "string" && /^[A-Za-z0-9._:-]{1,128}$/.test(id) ? id : randomUUID();
    },
    requestTimeout: timeouts.requestMs,
    http: {
      headersTimeout: timeouts.headersMs,
      requestTimeout: timeouts.requestMs,
      // How often Node looks for requests past those limits.
      connectionsCheckingInterval: Math.min(30_000, Math.max(250, Math.floor(timeouts.headersMs / 4))),
    },
    // Errors Fastify raises before routing (a path with a bad percent-encoding, a too-long parameter).
    frameworkErrors: (err, request, reply) => {
      const { status, body } = toErrorResponse(err as FastifyError);
      // An upgrade's socket left Node's HTTP handling: once answered, nothing else would close it.
      if (request.headers.upgrade !== undefined) reply.raw.once("finish", () => request.raw.socket.end());
      void (reply as unknown as FastifyReply).status(status).send(body);
    },
    // Errors Node's HTTP parser raises before Fastify sees a request: answered on the raw socket, in the envelope.
    clientErrorHandler: (err: Error & { code?: string }, socket: Socket) => {
      if (err.code === "ECONNRESET" || socket.destroyed) return;
      const [status, code, message] =
        err.code === "ERR_HTTP_REQUEST_TIMEOUT"
          ? [408, "RequestTimeout", `the request did not arrive within the server's limit (headers ${timeouts.headersMs / 1000} s, whole request ${timeouts.requestMs / 1000} s)`]
          : err.code === "HPE_HEADER_OVERFLOW"
            ? [431, "HeadersTooLarge", "the request's headers exceed 16 KiB"]
            : [400, "ValidationError", `malformed HTTP request (${err.code ?? "parse error"})`];
      const body = JSON.stringify(errorBody(code as ErrorCode, message));
      // Only if nothing of a response was written on this connection yet.
      if (socket.writable && socket.bytesWritten === 0) {
        socket.write(`HTTP/1.1 ${status} ${code}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
      }
      socket.destroy();
    },
  }).withTypeProvider<TypeBoxTypeProvider>();
}

export type Api = ReturnType<typeof createFastify>;

declare module "fastify" {
  interface FastifyRequest {
    /** Forwarded by a peer node over the node channel (cluster): served here, never forwarded again. */
    forwarded?: boolean;
    /** The tenant of the API key that authenticated the request. */
    tenantId: string;
  }
  interface FastifyContextConfig {
    /** Permission the route needs, e.g. "microvm:create"; absent: no authentication. */
    permission?: string;
    /** A WebSocket route that also takes a one-time `?ticket=` (TerminalTickets) instead of a key. */
    ticketed?: boolean;
    /** The route accepts WebSocket upgrades (a wsHandler); an upgrade to any other route is a 400. */
    upgrade?: boolean;
  }
}

export function errorBody(code: ErrorCode, message: string, details?: Record<string, unknown>) {
  return { error: { code, message, ...(details ? { details } : {}) } };
}

/** `url` with the values of credential parameters replaced, for logs. */
export function redactUrl(url: string): string {
  const q = url.indexOf("?");
  if (q < 0) return url;
  const params = url
    .slice(q + 1)
    .split("&")
    .map((pair) => {
      const eq = pair.indexOf("=");
      const name = eq < 0 ? pair : pair.slice(0, eq);
      let decoded = name;
      try {
        decoded = decodeURIComponent(name);
      } catch {
        // an undecodable name is no credential of ours
      }
      return SECRET_PARAMS.has(decoded) ? `${name}=[REDACTED]` : pair;
    });
  return `${url.slice(0, q)}?${params.join("&")}`;
}

/** Fastify's own errors for a client's mistake, by code: the status and message to answer with. */
const FRAMEWORK_ERRORS: Record<string, [ErrorCode, (err: FastifyError) => string]> = {
  FST_ERR_BAD_URL: ["ValidationError", () => "the URL path has an invalid percent-encoding"],
  FST_ERR_MAX_PARAM_LENGTH: ["ValidationError", () => "a path parameter exceeds 100 characters"],
  FST_ERR_CTP_INVALID_MEDIA_TYPE: ["UnsupportedMediaType", (err) => err.message],
  FST_ERR_CTP_BODY_TOO_LARGE: ["PayloadTooLarge", () => `the request body exceeds its limit of ${BODY_LIMIT_BYTES} bytes`],
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: ["ValidationError", () => "Content-Length does not match the body"],
  FST_ERR_CTP_INVALID_JSON_BODY: ["ValidationError", () => "the body is not valid JSON"],
};

/**
 * Maps any thrown error to a registered code: what is thrown below the API
 * (`toApiError`, shared with the AWS door), schema failures, Fastify's own
 * client errors. Anything else is a 500 whose details stay in the log.
 */
export function toErrorResponse(err: FastifyError): { status: number; body: ReturnType<typeof errorBody> } {
  const answer = (code: ErrorCode, message: string, details?: Record<string, unknown>) => ({ status: ERROR_CODES[code].status, body: errorBody(code, message, details) });
  const thrown = toApiError(err);
  if (thrown) return answer(thrown.code, thrown.message, thrown.details);
  if (err.validation) {
    const first = err.validation[0];
    const field = `${err.validationContext ?? "body"}${first?.instancePath?.replace(/\//g, ".") ?? ""}`;
    return answer("ValidationError", `${field} ${first?.message ?? "is invalid"}`, { field });
  }
  const known = err.code ? FRAMEWORK_ERRORS[err.code] : undefined;
  if (known) return answer(known[0], known[1](err));
  // JSON.parse's SyntaxError (Fastify sets 400), proto poisoning, and any other client error Fastify raises.
  if (err.statusCode === 413) return answer("PayloadTooLarge", err.message);
  if (err.statusCode === 415) return answer("UnsupportedMediaType", err.message);
  if (err.statusCode && err.statusCode >= 400 && err.statusCode < 500) return answer("ValidationError", err.message);
  // A body so deeply nested that a parser ran out of stack is the client's doing.
  if (err instanceof RangeError && /call stack/i.test(err.message)) return answer("ValidationError", "the body is nested too deeply");
  return answer("Internal", "internal error; see the server log");
}
