import { truncate } from "node:fs/promises";
import { request } from "node:http";
import { connect } from "node:net";
import { PassThrough } from "node:stream";
import WebSocket from "ws";
import { describe, expect, it } from "vitest";
import { machinePaths } from "../../src/vmm/qemu.ts";
import { useApi } from "../support/api-fixture.ts";
import { serveStatic, startApp, webSocketApp } from "../support/guest-apps.ts";

/**
 * The hostile-request corpus: requests nobody should send, and guests that
 * misbehave. Every case states the status it must get (4xx in the API's
 * envelope, or 502 for a guest's garbage), and the server must answer
 * /v1/health after each. Short request timeouts so slow clients end quickly.
 */
const log = new PassThrough();
let logText = "";
log.on("data", (d: Buffer) => (logText += d.toString()));
const TIMEOUTS = { headersMs: 2_000, requestMs: 4_000 };
/** A small budget for buffered exec answers: one 4 MiB answer of NULs (60 MiB charged) fits, a second does not. */
const EXEC_OUTPUT_BUDGET_MIB = 96;
const api = await useApi({ policyIntervalMs: 500, api: { timeouts: TIMEOUTS, logger: true, logStream: log, execOutputBudgetBytes: EXEC_OUTPUT_BUDGET_MIB * 2 ** 20 } });
const port = Number(new URL(api.url).port);
const owner = await api.tenantKey("heidi");
const stranger = await api.tenantKey("ivan");
const revoked = await api.tenantKey("heidi", ["microvm:read"]);
{
  const keys = (await api.call("GET", "/v1/keys", { key: api.adminKey })).body.keys as { keyId: string; permissions: string[]; tenantId: string }[];
  const id = keys.filter((k) => k.permissions.join() === "microvm:read").at(-1)!.keyId;
  await api.call("DELETE", `/v1/keys/${id}`, { key: api.adminKey });
}

/** One VM for every case that needs one: a static app on 8080 (answers below), a WebSocket app on 8081 that misbehaves on command. */
const created = await api.call("POST", "/v1/microvms", { key: owner, body: { image: "base", appPort: 8080, idlePolicy: { suspendAfterSeconds: 0 } } });
expect(created.status, created.text).toBe(201);
const vm = created.body as { microVmId: string; endpoint: { url: string; token: string } };
const ID = vm.microVmId;
const TOKEN = vm.endpoint.token;
const VM_HOST = `${ID}.vm.localhost:${port}`;
await serveStatic(api, owner, ID, 8080, {
  "index.html": "<h1>hello</h1>",
  "status-099.raw": "HTTP/1.1 099 Odd\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
  "status-600.raw": "HTTP/1.1 600 Odd\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
  "garbage.raw": "THIS IS NOT HTTP\r\n\r\n",
  "bad-header.raw": "HTTP/1.1 200 OK\r\nX-Odd: a\u0001b\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
  "huge-header.raw": `HTTP/1.1 200 OK\r\nX-Big: ${"b".repeat(64 * 1024)}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`,
  "origin-wide.html": "<p>cookies</p>",
  "origin-wide.html.headers": "Set-Cookie: session=1; Path=/\r\nService-Worker-Allowed: /\r\nClear-Site-Data: \"*\"\r\nStrict-Transport-Security: max-age=31536000\r\n",
});
/**
 * A WebSocket app that, on message "drop", closes its TCP connection without a
 * close frame (1006 on the relay), on "nocode" sends a close frame without a
 * code (1005), on "badcode" one with code 999 (not allowed on the wire), on
 * "reason" one with code 4000 and a 122-byte UTF-8 reason; anything else is echoed.
 */
const WS_APP = webSocketApp(
  8081,
  `if ($p eq "drop") { last }
      elsif ($p eq "nocode") { print $c pack("CC", 0x88, 0); last }
      elsif ($p eq "badcode") { print $c pack("CCn", 0x88, 2, 999); last }
      elsif ($p eq "reason") { my $r = "\\xc3\\xa9" x 60; print $c pack("CCn", 0x88, 122, 4000) . $r; last }
      else { my $o = "echo:$p"; print $c pack("CC", 0x81, length $o) . $o }`,
);
await startApp(api, owner, ID, WS_APP, 8081);

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** Sends bytes exactly as given (no client-side validation) and reads the answer to its end. */
function raw(text: string | Buffer, opts: { trickle?: string; everyMs?: number } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, "127.0.0.1");
    const chunks: Buffer[] = [];
    let timer: NodeJS.Timeout | undefined;
    // Every case gets its answer, and the connection ends, well within this.
    const deadline = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no end of the answer within 30 s to ${JSON.stringify(text.toString("latin1").slice(0, 120))}; got ${JSON.stringify(Buffer.concat(chunks).toString("latin1").slice(0, 200))}`));
    }, 30_000);
    socket.on("connect", () => {
      socket.write(text);
      if (opts.trickle) timer = setInterval(() => !socket.destroyed && socket.write(opts.trickle!), opts.everyMs ?? 500);
    });
    socket.on("data", (d) => chunks.push(d));
    socket.on("error", () => undefined); // a reset after the answer is fine
    socket.on("close", () => {
      clearInterval(timer);
      clearTimeout(deadline);
      const all = Buffer.concat(chunks).toString("latin1");
      const [head = "", ...rest] = all.split("\r\n\r\n");
      const [statusLine = "", ...lines] = head.split("\r\n");
      const status = Number(statusLine.split(" ")[1]);
      if (!status) return reject(new Error(`no HTTP answer: ${JSON.stringify(all.slice(0, 200))}`));
      const headers: Answer["headers"] = {};
      for (const l of lines) headers[l.slice(0, l.indexOf(":")).toLowerCase()] = l.slice(l.indexOf(":") + 1).trim();
      const body = rest.join("\r\n\r\n");
      resolve({ status, headers, body: headers["transfer-encoding"] === "chunked" ? unchunk(body) : body });
    });
  });
}

/** The payload of a chunked body. */
function unchunk(body: string): string {
  let out = "";
  for (let at = 0; ; ) {
    const eol = body.indexOf("\r\n", at);
    const size = parseInt(body.slice(at, eol), 16);
    if (!(size > 0)) return out;
    out += body.slice(eol + 2, eol + 2 + size);
    at = eol + 2 + size + 2;
  }
}

/** A request line and headers (Connection: close added), optionally with a body. */
function http(method: string, path: string, headers: Record<string, string> = {}, body?: string | Buffer): Promise<Answer> {
  const lines = [`${method} ${path} HTTP/1.1`, `Host: ${headers.host ?? `127.0.0.1:${port}`}`, "Connection: close"];
  for (const [k, v] of Object.entries(headers)) if (k !== "host") lines.push(`${k}: ${v}`);
  if (body !== undefined) lines.push(`Content-Length: ${Buffer.byteLength(body)}`);
  const head = Buffer.from(`${lines.join("\r\n")}\r\n\r\n`, "latin1");
  return raw(body === undefined ? head : Buffer.concat([head, Buffer.from(body)]));
}

const WS_HEADERS = { Connection: "Upgrade", Upgrade: "websocket", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==" };
const bearer = (key: string) => ({ Authorization: `Bearer ${key}` });
const json = (body: unknown) => ({ "Content-Type": "application/json", body: JSON.stringify(body) });
const nested = (depth: number) => `${"[".repeat(depth)}${"]".repeat(depth)}`;
const E = "%C3%A9".repeat(100); // 100 × "é", percent-encoded: a 600-byte path segment
const LONG = "a".repeat(5000);
const MiB = 2 ** 20;

interface Case {
  name: string;
  send: () => Promise<Answer>;
  /** The status the case must get. */
  status: number;
  /** The envelope's code (omitted: the status is the app's, passed through). */
  code?: string;
  check?: (a: Answer) => void;
}

const post = (path: string, headers: Record<string, string>, body: string) => http("POST", path, headers, body);
const withBody = (method: string, path: string, h: Record<string, string>, b: { "Content-Type": string; body: string }) =>
  http(method, path, { ...h, "Content-Type": b["Content-Type"] }, b.body);

const cases: Case[] = [
  // WebSocket upgrades on every WebSocket route, with odd ids and headers: refused before any upgrade.
  { name: "terminal upgrade, 100 × é id, no key", send: () => http("GET", `/v1/microvms/${E}/terminal`, WS_HEADERS), status: 401, code: "Unauthorized" },
  { name: "terminal upgrade, 100 × é id", send: () => http("GET", `/v1/microvms/${E}/terminal`, { ...WS_HEADERS, ...bearer(owner) }), status: 400, code: "ValidationError" },
  { name: "terminal upgrade, %00 id", send: () => http("GET", "/v1/microvms/%00/terminal", { ...WS_HEADERS, ...bearer(owner) }), status: 404, code: "NotFound" },
  { name: "terminal upgrade, .. id", send: () => http("GET", "/v1/microvms/../terminal", { ...WS_HEADERS, ...bearer(owner) }), status: 404, code: "NotFound" },
  { name: "terminal upgrade, 5000-char id", send: () => http("GET", `/v1/microvms/${LONG}/terminal`, { ...WS_HEADERS, ...bearer(owner) }), status: 400, code: "ValidationError" },
  { name: "terminal upgrade, unknown ticket", send: () => http("GET", `/v1/microvms/${ID}/terminal?ticket=tt_nope`, WS_HEADERS), status: 401, code: "Unauthorized" },
  { name: "terminal upgrade, CRLF access_token", send: () => http("GET", `/v1/microvms/${ID}/terminal?access_token=%0d%0aX:%201`, WS_HEADERS), status: 401, code: "Unauthorized" },
  { name: "terminal upgrade, another tenant's VM", send: () => http("GET", `/v1/microvms/${ID}/terminal`, { ...WS_HEADERS, ...bearer(stranger) }), status: 404, code: "NotFound" },
  { name: "terminal upgrade, bad Sec-WebSocket-Key", send: () => http("GET", `/v1/microvms/${ID}/terminal`, { ...WS_HEADERS, "Sec-WebSocket-Key": "short", ...bearer(owner) }), status: 400, code: "ValidationError" },
  { name: "terminal upgrade, version 99", send: () => http("GET", `/v1/microvms/${ID}/terminal`, { ...WS_HEADERS, "Sec-WebSocket-Version": "99", ...bearer(owner) }), status: 400, code: "ValidationError" },
  { name: "terminal upgrade, bad subprotocol list", send: () => http("GET", `/v1/microvms/${ID}/terminal`, { ...WS_HEADERS, "Sec-WebSocket-Protocol": "a,,\"b\"", ...bearer(owner) }), status: 400, code: "ValidationError" },
  { name: "upgrade to a route that is no WebSocket", send: () => http("GET", "/v1/health", WS_HEADERS), status: 400, code: "ValidationError" },
  { name: "upgrade to another protocol", send: () => http("GET", `/v1/microvms/${ID}/terminal`, { ...WS_HEADERS, Upgrade: "h2c", ...bearer(owner) }), status: 400, code: "ValidationError" },
  { name: "endpoint path upgrade, 100 × é id", send: () => http("GET", `/v1/microvms/${E}/http/`, WS_HEADERS), status: 404, code: "NotFound" },
  { name: "endpoint path upgrade, %00 id", send: () => http("GET", "/v1/microvms/%00/http/", WS_HEADERS), status: 404, code: "NotFound" },
  { name: "endpoint path upgrade, .. id", send: () => http("GET", "/v1/microvms/../http/x", WS_HEADERS), status: 404, code: "NotFound" },
  { name: "endpoint path upgrade, 5000-char id", send: () => http("GET", `/v1/microvms/${LONG}/http/`, WS_HEADERS), status: 400, code: "ValidationError" },
  { name: "endpoint path upgrade, no credential", send: () => http("GET", `/v1/microvms/${ID}/http/`, WS_HEADERS), status: 404, code: "NotFound" },
  { name: "endpoint path upgrade, cookie from another origin", send: () => http("GET", `/v1/microvms/${ID}/http/`, { ...WS_HEADERS, Cookie: `cocoon_token_${ID}=${TOKEN}`, Origin: "http://evil.example" }), status: 403, code: "Forbidden" },
  { name: "endpoint path upgrade, CRLF cocoon_token", send: () => http("GET", `/v1/microvms/${ID}/http/?cocoon_token=%0d%0a`, WS_HEADERS), status: 404, code: "NotFound" },
  { name: "endpoint path upgrade, bad key header", send: () => http("GET", `/v1/microvms/${ID}/http/`, { ...WS_HEADERS, "Sec-WebSocket-Key": "!!", ...bearer(TOKEN) }), status: 400, code: "ValidationError" },
  { name: "endpoint host upgrade, unknown VM", send: () => http("GET", "/", { ...WS_HEADERS, host: `vm-00000000.vm.localhost:${port}` }), status: 404, code: "NotFound" },
  { name: "endpoint host upgrade, port 99999", send: () => http("GET", "/", { ...WS_HEADERS, host: `99999-${VM_HOST}`, ...bearer(TOKEN) }), status: 404, code: "NotFound" },
  { name: "endpoint host upgrade, another tenant's key", send: () => http("GET", "/", { ...WS_HEADERS, host: VM_HOST, ...bearer(stranger) }), status: 404, code: "NotFound" },
  { name: "endpoint host upgrade, the agent's port", send: () => http("GET", "/", { ...WS_HEADERS, host: `10789-${VM_HOST}`, ...bearer(TOKEN) }), status: 404, code: "NotFound" },

  // Header injection in every parameter that reaches a header.
  { name: "host form, CRLF cocoon_token, no credential", send: () => http("GET", "/?cocoon_token=%0d%0aSet-Cookie:%20x=1", { host: VM_HOST }), status: 404, code: "NotFound", check: (a) => expect(a.headers["set-cookie"]).toBeUndefined() },
  { name: "host form, LF cocoon_token with a valid key", send: () => http("GET", "/?cocoon_token=%0a", { host: VM_HOST, ...bearer(owner) }), status: 200, check: (a) => expect(a.headers["set-cookie"]).toBeUndefined() },
  { name: "path form, CRLF cocoon_token with the token", send: () => http("GET", `/v1/microvms/${ID}/http/?cocoon_token=%0d%0aSet-Cookie:%20evil=1`, bearer(TOKEN)), status: 200, check: (a) => expect(JSON.stringify(a.headers)).not.toContain("evil") },
  { name: "CRLF in a VM id", send: () => http("GET", "/v1/microvms/vm-%0d%0aSet-Cookie:%20x=1", bearer(owner)), status: 404, code: "NotFound", check: (a) => expect(a.headers["set-cookie"]).toBeUndefined() },
  { name: "CRLF in an endpoint id", send: () => http("GET", "/v1/microvms/%0d%0a/http/", bearer(owner)), status: 404, code: "NotFound" },
  { name: "CRLF in an app path", send: () => http("GET", `/v1/microvms/${ID}/http/%0d%0aSet-Cookie:%20x=1`, bearer(TOKEN)), status: 404, check: (a) => expect(a.headers["set-cookie"]).toBeUndefined() },
  { name: "CRLF in a file path", send: () => http("GET", `/v1/microvms/${ID}/files?path=/tmp/%0d%0aX`, bearer(owner)), status: 404, code: "NotFound" },
  { name: "x-request-id that is not a token", send: () => http("GET", "/v1/health", { "x-request-id": "a%0d%0aSet-Cookie: x=1" }), status: 200, check: (a) => expect(a.headers["x-request-id"]).toMatch(/^[0-9a-f-]{36}$/) },
  { name: "x-request-id that is a token", send: () => http("GET", "/v1/health", { "x-request-id": "req-42.a:b" }), status: 200, check: (a) => expect(a.headers["x-request-id"]).toBe("req-42.a:b") },
  { name: "Authorization with CRLF escapes", send: () => http("GET", "/v1/microvms", { Authorization: "Bearer %0d%0a" }), status: 401, code: "Unauthorized" },
  { name: "X-aws-proxy-auth garbage", send: () => http("GET", "/", { host: VM_HOST, "X-aws-proxy-auth": "x.y%0d%0a" }), status: 404, code: "NotFound" },

  // Bad percent-encodings on every path.
  { name: "GET /v1/microvms/%zz", send: () => http("GET", "/v1/microvms/%zz", bearer(owner)), status: 400, code: "ValidationError" },
  { name: "GET /v1/microvms/%00%ff", send: () => http("GET", "/v1/microvms/%00%ff", bearer(owner)), status: 400, code: "ValidationError" },
  { name: "GET /v1/microvms/%E0%A4%A", send: () => http("GET", "/v1/microvms/%E0%A4%A", bearer(owner)), status: 400, code: "ValidationError" },
  { name: "GET /v1/images/%zz", send: () => http("GET", "/v1/images/%zz", bearer(owner)), status: 400, code: "ValidationError" },
  { name: "POST …/%zz/exec", send: () => withBody("POST", "/v1/microvms/%zz/exec", bearer(owner), json({ command: "true" })), status: 400, code: "ValidationError" },
  { name: "GET …/%zz/files", send: () => http("GET", "/v1/microvms/%zz/files?path=/", bearer(owner)), status: 400, code: "ValidationError" },
  { name: "PUT …/%zz/files", send: () => http("PUT", "/v1/microvms/%zz/files?path=/x", bearer(owner), "x"), status: 400, code: "ValidationError" },
  { name: "DELETE /v1/keys/%zz", send: () => http("DELETE", "/v1/keys/%zz", bearer(api.adminKey)), status: 400, code: "ValidationError" },
  { name: "terminal %zz", send: () => http("GET", "/v1/microvms/%zz/terminal", { ...WS_HEADERS, ...bearer(owner) }), status: 400, code: "ValidationError" },
  { name: "GET /v1/microvms/x/http//[", send: () => http("GET", "/v1/microvms/x/http//[", {}), status: 404, code: "NotFound" },
  { name: "GET /v1/microvms/%zz/http/", send: () => http("GET", "/v1/microvms/%zz/http/", {}), status: 400, code: "ValidationError" },
  { name: "endpoint app path %zz", send: () => http("GET", `/v1/microvms/${ID}/http/%zz`, bearer(TOKEN)), status: 400, code: "ValidationError" },
  { name: "host form path %zz", send: () => http("GET", "/%zz", { host: VM_HOST, ...bearer(TOKEN) }), status: 400, code: "ValidationError" },
  { name: "file path %zz", send: () => http("GET", `/v1/microvms/${ID}/files?path=%zz`, bearer(owner)), status: 400, code: "ValidationError" },
  { name: "list with state=%zz", send: () => http("GET", "/v1/microvms?state=%zz", bearer(owner)), status: 400, code: "ValidationError" },
  { name: "console %zz", send: () => http("GET", "/console/%zz", {}), status: 400, code: "ValidationError" },
  { name: "absolute-form request target", send: () => http("GET", `http://${VM_HOST}/`, { host: VM_HOST, ...bearer(TOKEN) }), status: 400, code: "ValidationError" },

  // Huge headers and bodies.
  { name: "a 20 KiB header", send: () => http("GET", "/v1/health", { "X-Big": "h".repeat(20 * 1024) }), status: 431, code: "HeadersTooLarge" },
  { name: "200 headers of 100 bytes", send: () => http("GET", "/v1/health", Object.fromEntries(Array.from({ length: 200 }, (_, i) => [`X-H${i}`, "v".repeat(100)]))), status: 431, code: "HeadersTooLarge" },
  { name: "create with a 2 MiB body", send: () => withBody("POST", "/v1/microvms", bearer(owner), json({ image: "base", metadata: { a: "x".repeat(2 * MiB) } })), status: 413, code: "PayloadTooLarge" },
  { name: "exec with a 2 MiB body", send: () => withBody("POST", `/v1/microvms/${ID}/exec`, bearer(owner), json({ command: "x".repeat(2 * MiB) })), status: 413, code: "PayloadTooLarge" },
  { name: "keys with a 2 MiB body", send: () => withBody("POST", "/v1/keys", bearer(api.adminKey), json({ tenant: "x".repeat(2 * MiB) })), status: 413, code: "PayloadTooLarge" },
  { name: "images with a 2 MiB JSON body", send: () => withBody("POST", "/v1/images", bearer(api.adminKey), json({ name: "x", codeUri: "x".repeat(2 * MiB) })), status: 413, code: "PayloadTooLarge" },
  { name: "2 MiB of text to a JSON route", send: () => http("POST", "/v1/microvms", { ...bearer(owner), "Content-Type": "text/plain" }, "x".repeat(2 * MiB)), status: 413, code: "PayloadTooLarge" },
  { name: "an upload declaring 9 GiB", send: () => raw(`PUT /v1/microvms/${ID}/files?path=/tmp/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${owner}\r\nContent-Length: ${9 * 2 ** 30}\r\nConnection: close\r\n\r\n`), status: 413, code: "PayloadTooLarge" },
  { name: "a JSON upload past 1 MiB goes to the file, not a parser", send: () => http("PUT", `/v1/microvms/${ID}/files?path=/tmp/json-upload`, { ...bearer(owner), "Content-Type": "application/json" }, "[".repeat(3 * MiB)), status: 200 },

  // Deep JSON, odd JSON and wrong content types.
  { name: "a 10k-deep array as the body", send: () => post("/v1/microvms", { ...bearer(owner), "Content-Type": "application/json" }, nested(10_000)), status: 400, code: "ValidationError" },
  { name: "10k-deep metadata", send: () => post("/v1/microvms", { ...bearer(owner), "Content-Type": "application/json" }, `{"image":"base","metadata":{"a":${nested(10_000)}}}`), status: 400, code: "ValidationError" },
  { name: "500k-deep metadata", send: () => post("/v1/microvms", { ...bearer(owner), "Content-Type": "application/json" }, `{"image":"base","metadata":{"a":${nested(500_000)}}}`), status: 400, code: "ValidationError" },
  { name: "10k-deep exec env", send: () => post(`/v1/microvms/${ID}/exec`, { ...bearer(owner), "Content-Type": "application/json" }, `{"command":"true","env":{"A":${nested(10_000)}}}`), status: 400, code: "ValidationError" },
  { name: "__proto__ in a body", send: () => post("/v1/microvms", { ...bearer(owner), "Content-Type": "application/json" }, '{"image":"base","__proto__":{"admin":true}}'), status: 400, code: "ValidationError" },
  { name: "constructor.prototype in a body", send: () => post("/v1/microvms", { ...bearer(owner), "Content-Type": "application/json" }, '{"image":"base","constructor":{"prototype":{"x":1}}}'), status: 400, code: "ValidationError" },
  { name: "truncated JSON", send: () => post("/v1/microvms", { ...bearer(owner), "Content-Type": "application/json" }, '{"image":'), status: 400, code: "ValidationError" },
  { name: "JSON null", send: () => post("/v1/microvms", { ...bearer(owner), "Content-Type": "application/json" }, "null"), status: 400, code: "ValidationError" },
  { name: "form-encoded body", send: () => post("/v1/microvms", { ...bearer(owner), "Content-Type": "application/x-www-form-urlencoded" }, "image=base"), status: 415, code: "UnsupportedMediaType" },
  { name: "JSON sent as text/plain", send: () => post("/v1/microvms", { ...bearer(owner), "Content-Type": "text/plain" }, '{"image":"base"}'), status: 400, code: "ValidationError" },
  { name: "exec command as an object", send: () => withBody("POST", `/v1/microvms/${ID}/exec`, bearer(owner), json({ command: { sh: "id" } })), status: 400, code: "ValidationError" },
  { name: "terminal ticket with an empty JSON body", send: () => http("POST", `/v1/microvms/${ID}/terminal/tickets`, { ...bearer(owner), "Content-Type": "application/json" }, ""), status: 201 },
  { name: "suspend with an empty JSON body", send: () => http("POST", "/v1/microvms/vm-00000000/suspend", { ...bearer(owner), "Content-Type": "application/json" }, ""), status: 404, code: "NotFound" },
  { name: "DELETE with an empty JSON body", send: () => http("DELETE", "/v1/microvms/vm-00000000", { ...bearer(owner), "Content-Type": "application/json" }, ""), status: 404, code: "NotFound" },
  { name: "DELETE /v1/keys with an empty JSON body", send: () => http("DELETE", "/v1/keys/k-none", { ...bearer(api.adminKey), "Content-Type": "application/json" }, ""), status: 404, code: "NotFound" },
  { name: "auth-tokens for ports 9..1", send: () => withBody("POST", `/v1/microvms/${ID}/auth-tokens`, bearer(owner), json({ ports: [{ range: { startPort: 9, endPort: 1 } }], expiresInMinutes: 5 })), status: 400, code: "ValidationError" },

  // Unauthenticated and cross-tenant.
  { name: "describe without a key", send: () => http("GET", `/v1/microvms/${ID}`), status: 401, code: "Unauthorized" },
  { name: "describe with a revoked key", send: () => http("GET", `/v1/microvms/${ID}`, bearer(revoked)), status: 401, code: "Unauthorized" },
  { name: "describe with 10 KB of key", send: () => http("GET", `/v1/microvms/${ID}`, bearer("k".repeat(10_000))), status: 401, code: "Unauthorized" },
  { name: "describe another tenant's VM", send: () => http("GET", `/v1/microvms/${ID}`, bearer(stranger)), status: 404, code: "NotFound" },
  { name: "exec in another tenant's VM", send: () => withBody("POST", `/v1/microvms/${ID}/exec`, bearer(stranger), json({ command: "id" })), status: 404, code: "NotFound" },
  { name: "read another tenant's files", send: () => http("GET", `/v1/microvms/${ID}/files?path=/etc/hostname`, bearer(stranger)), status: 404, code: "NotFound" },
  { name: "write another tenant's files", send: () => http("PUT", `/v1/microvms/${ID}/files?path=/tmp/x`, bearer(stranger), "pwned"), status: 404, code: "NotFound" },
  { name: "another tenant's logs", send: () => http("GET", `/v1/microvms/${ID}/logs`, bearer(stranger)), status: 404, code: "NotFound" },
  { name: "another tenant's metrics", send: () => http("GET", `/v1/microvms/${ID}/metrics`, bearer(stranger)), status: 404, code: "NotFound" },
  { name: "another tenant's terminal ticket", send: () => http("POST", `/v1/microvms/${ID}/terminal/tickets`, bearer(stranger)), status: 404, code: "NotFound" },
  { name: "another tenant's access token", send: () => withBody("POST", `/v1/microvms/${ID}/auth-tokens`, bearer(stranger), json({ ports: [{ allPorts: true }], expiresInMinutes: 5 })), status: 404, code: "NotFound" },
  { name: "shell with a forged token", send: () => http("GET", `/v1/microvms/${ID}/shell`, { ...WS_HEADERS, "X-aws-proxy-auth": "cat_x.y" }), status: 401, code: "Unauthorized" },
  { name: "shell token in the query, CRLF", send: () => http("GET", `/v1/microvms/${ID}/shell?token=%0d%0a`, WS_HEADERS), status: 401, code: "Unauthorized" },
  { name: "another tenant's endpoint", send: () => http("GET", "/", { host: VM_HOST, ...bearer(stranger) }), status: 404, code: "NotFound" },
  { name: "/metrics with a tenant key", send: () => http("GET", "/metrics", bearer(owner)), status: 403, code: "Forbidden" },
  { name: "create a key with a tenant key", send: () => withBody("POST", "/v1/keys", bearer(owner), json({ tenant: "heidi", permissions: ["admin:*"] })), status: 403, code: "Forbidden" },

  // Apps that answer garbage: 502 in the envelope.
  { name: "app answers status 099", send: () => http("GET", "/status-099", { host: VM_HOST, ...bearer(TOKEN) }), status: 502, code: "BadGateway" },
  { name: "app answers status 600", send: () => http("GET", "/status-600", { host: VM_HOST, ...bearer(TOKEN) }), status: 502, code: "BadGateway" },
  { name: "app answers garbage", send: () => http("GET", "/garbage", { host: VM_HOST, ...bearer(TOKEN) }), status: 502, code: "BadGateway" },
  { name: "app answers a control character in a header", send: () => http("GET", "/bad-header", { host: VM_HOST, ...bearer(TOKEN) }), status: 502, code: "BadGateway" },
  { name: "app answers a 64 KiB header", send: () => http("GET", "/huge-header", { host: VM_HOST, ...bearer(TOKEN) }), status: 502, code: "BadGateway" },
  { name: "nothing listens on the port", send: () => http("GET", "/", { host: `9999-${VM_HOST}`, ...bearer(TOKEN) }), status: 502, code: "BadGateway" },
  {
    name: "path form strips origin-wide headers",
    send: () => http("GET", `/v1/microvms/${ID}/http/origin-wide.html`, bearer(TOKEN)),
    status: 200,
    check: (a) => {
      for (const h of ["set-cookie", "service-worker-allowed", "clear-site-data", "strict-transport-security"]) expect(a.headers[h], h).toBeUndefined();
      expect(a.headers["content-security-policy"]).toMatch(/^sandbox /);
    },
  },
];

async function healthy(): Promise<void> {
  const res = await fetch(`${api.url}/v1/health`);
  expect(res.status).toBe(200);
}

describe("hostile requests", () => {
  it("are at least 60 cases", () => expect(cases.length).toBeGreaterThanOrEqual(60));

  it.each(cases.map((c) => [c.name, c] as const))("%s", async (_name, c) => {
    const answer = await c.send();
    expect(answer.status, answer.body.slice(0, 300)).toBe(c.status);
    if (c.code) {
      const body = JSON.parse(answer.body) as { error: { code: string; message: string } };
      expect(body.error.code).toBe(c.code);
      expect(typeof body.error.message).toBe("string");
    }
    c.check?.(answer);
    await healthy();
  });
});

describe("slow clients", () => {
  it("a client trickling its headers gets a 408 in the envelope", async () => {
    const answer = await raw("GET /v1/health HTTP/1.1\r\nHost: x\r\n", { trickle: "X-Slow: 1\r\n", everyMs: 300 });
    expect(answer.status).toBe(408);
    expect(JSON.parse(answer.body).error.code).toBe("RequestTimeout");
    await healthy();
  });

  it("a slow-loris upload is cut at the request timeout", async () => {
    const started = Date.now();
    const answer = await raw(`PUT /v1/microvms/${ID}/files?path=/tmp/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${owner}\r\nContent-Length: 1000000\r\n\r\n`, { trickle: "x", everyMs: 200 });
    expect(answer.status).toBe(408);
    expect(JSON.parse(answer.body).error.code).toBe("RequestTimeout");
    expect(Date.now() - started).toBeLessThan(TIMEOUTS.requestMs + 30_000);
    await healthy();
  });
});

describe("WebSockets that misbehave", () => {
  const open = (path: string, headers: Record<string, string>) =>
    new Promise<WebSocket>((resolve, reject) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}${path}`, { headers });
      ws.on("open", () => resolve(ws));
      ws.on("error", reject);
    });
  const closeOf = (ws: WebSocket) => new Promise<[number, string]>((resolve) => ws.on("close", (code, reason) => resolve([code, reason.toString()])));

  it.each([
    ["drop", 1001], // the app dropped the socket (1006 on the relay): going away
    ["nocode", 1000], // a close without a code (1005): normal
    ["badcode", 1011], // a code that may not be sent: the relay fails the upstream
    ["reason", 4000],
  ] as const)("an app that answers %s is relayed as a close the client can get (%i)", async (command, expected) => {
    const ws = await open("/", { host: `8081-${VM_HOST}`, authorization: `Bearer ${TOKEN}` });
    const closed = closeOf(ws);
    ws.send("hello");
    await new Promise((r) => ws.once("message", r));
    ws.send(command);
    const [code, reason] = await closed;
    expect(code).toBe(expected);
    expect(Buffer.byteLength(reason)).toBeLessThanOrEqual(123);
    if (command === "reason") expect(reason).toBe("é".repeat(60));
    await healthy();
  });

  it("a WebSocket to a port that is no WebSocket server closes with 1011 and a bounded reason", async () => {
    const ws = await open(`/v1/microvms/${ID}/http/${"é".repeat(100)}`, { authorization: `Bearer ${TOKEN}` });
    const [code, reason] = await closeOf(ws);
    expect(code).toBe(1011);
    expect(Buffer.byteLength(reason)).toBeLessThanOrEqual(123);
    await healthy();
  });

  it("the terminal takes hostile control messages without harm", async () => {
    const { ticket } = (await api.call("POST", `/v1/microvms/${ID}/terminal/tickets`, { key: owner })).body as { ticket: string };
    const ws = await open(`/v1/microvms/${ID}/terminal?ticket=${ticket}`, {});
    let output = "";
    ws.on("message", (d: Buffer, isBinary: boolean) => isBinary && (output += d.toString()));
    for (const m of ['{"type":"resize","cols":70000,"rows":1}', '{"type":"resize","cols":-1,"rows":"x"}', '{"type":"resize"}', "[[[[", "{}"]) ws.send(m);
    // What was typed as text ("[[[[{}") runs as a (failing) command first.
    ws.send(Buffer.from("\necho term-$((40+2))\n"), { binary: true });
    const deadline = Date.now() + 60_000;
    while (!output.includes("term-42") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    expect(output).toContain("term-42");
    ws.close();
    // A ticket opens one terminal only.
    await expect(open(`/v1/microvms/${ID}/terminal?ticket=${ticket}`, {})).rejects.toThrow("401");
    await healthy();
  });
});

describe("guests that flood", () => {
  /** The peak growth of this process's RSS (the server runs in it) while `fn` runs. */
  async function peakRssGrowth<T>(fn: () => Promise<T>): Promise<[T, number]> {
    const base = process.memoryUsage().rss;
    let peak = base;
    const timer = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 50);
    try {
      const result = await fn();
      return [result, (Math.max(peak, process.memoryUsage().rss) - base) / MiB];
    } finally {
      clearInterval(timer);
    }
  }

  it("exec of `head -c 300M /dev/zero` keeps 4 MiB of it, says so, and the server's memory stays bounded", { timeout: 600_000 }, async () => {
    const [res, growthMiB] = await peakRssGrowth(() =>
      api.call("POST", `/v1/microvms/${ID}/exec`, { key: owner, body: { command: "head -c 300M /dev/zero; echo done >&2", timeoutSeconds: 500 } }),
    );
    expect(res.status, res.text.slice(0, 300)).toBe(200);
    expect(res.body).toMatchObject({ exitCode: 0, stderr: "done\n", truncated: { stdout: true } });
    expect(res.body.stdout.length).toBe(4 * MiB);
    expect(growthMiB).toBeLessThan(200);
    console.log(`exec flood: RSS grew ${growthMiB.toFixed(0)} MiB at most`);
    await healthy();
  });

  it("buffered floods at once, and an answer read slowly, share one output budget: past it output is cut and flagged, and it comes back as answers are sent", { timeout: 300_000 }, async () => {
    const nulFlood = (mib: number) => api.call("POST", `/v1/microvms/${ID}/exec`, { key: owner, body: { command: `head -c ${mib}M /dev/zero`, timeoutSeconds: 200 } });
    // NULs are the worst case: 15 bytes charged per byte kept (answerBytes).
    const keptAtMost = (EXEC_OUTPUT_BUDGET_MIB * MiB) / 15;
    const floods = await Promise.all([nulFlood(8), nulFlood(8), nulFlood(8)]);
    for (const f of floods) expect(f.body).toMatchObject({ exitCode: 0, truncated: { stdout: true } });
    const kept = floods.map((f) => (f.body.stdout as string).length);
    expect(kept.reduce((a, b) => a + b)).toBeLessThanOrEqual(keptAtMost);
    // Each answer sent gave its share back: one flood alone keeps its 4 MiB.
    expect(((await nulFlood(8)).body.stdout as string).length).toBe(4 * MiB);

    // A client that stops reading its 24 MiB answer holds its charge...
    const slow = await new Promise<{ resume(): Promise<number> }>((resolve, reject) => {
      const req = request({ host: "127.0.0.1", port, method: "POST", path: `/v1/microvms/${ID}/exec`, headers: { authorization: `Bearer ${owner}`, "content-type": "application/json" } }, (res) => {
        res.pause();
        resolve({
          resume: () =>
            new Promise((done) => {
              let bytes = 0;
              res.on("data", (d: Buffer) => (bytes += d.length));
              res.on("end", () => done(bytes));
              res.resume();
            }),
        });
      });
      req.on("error", reject);
      req.end(JSON.stringify({ command: "head -c 4M /dev/zero", timeoutSeconds: 200 }));
    });
    // ...so another answer keeps only what is left of the budget...
    const squeezed = await nulFlood(4);
    expect(squeezed.body).toMatchObject({ exitCode: 0, truncated: { stdout: true } });
    expect((squeezed.body.stdout as string).length).toBeLessThan(4 * MiB);
    // ...until the slow one is read to its end.
    expect(await slow.resume()).toBeGreaterThan(24 * MiB);
    expect(((await nulFlood(4)).body.stdout as string).length).toBe(4 * MiB);
    await healthy();
  });

  it("a streamed flood read slowly waits for its reader instead of filling the server's memory", { timeout: 300_000 }, async () => {
    const [received, growthMiB] = await peakRssGrowth(
      () =>
        new Promise<number>((resolve, reject) => {
          const req = request(
            { host: "127.0.0.1", port, method: "POST", path: `/v1/microvms/${ID}/exec`, headers: { authorization: `Bearer ${owner}`, "content-type": "application/json", accept: "application/x-ndjson" } },
            (res) => {
              let bytes = 0;
              res.once("data", (d: Buffer) => {
                bytes += d.length;
                res.pause(); // a reader that stops reading for 10 s
                setTimeout(() => {
                  req.destroy();
                  resolve(bytes);
                }, 10_000);
              });
            },
          );
          req.on("error", () => undefined);
          req.on("close", () => undefined);
          req.end(JSON.stringify({ command: "head -c 300M /dev/zero", timeoutSeconds: 120 }));
          req.on("error", reject);
        }),
    );
    expect(received).toBeGreaterThan(0);
    expect(growthMiB).toBeLessThan(64);
    console.log(`paused streamed exec: RSS grew ${growthMiB.toFixed(0)} MiB at most`);
    // The command went with its reader: the VM answers at once.
    expect((await api.call("POST", `/v1/microvms/${ID}/exec`, { key: owner, body: { command: "echo ok" } })).body.stdout).toBe("ok\n");
    await healthy();
  });

  it("a console flood is served from the file, with back-pressure for a slow reader", { timeout: 300_000 }, async () => {
    // The guest floods its serial console (slow under TCG: a few hundred KB); then the file is grown on
    // the host to the engine's console cap (16 MiB; past it the engine cuts the file back), as a guest
    // that wrote for hours would leave it.
    const flood = await api.call("POST", `/v1/microvms/${ID}/exec`, { key: owner, body: { command: "yes console-flood | head -c 200K > /dev/ttyS0; echo console-end > /dev/ttyS0", timeoutSeconds: 200 } });
    expect(flood.body.exitCode).toBe(0);
    const logs = await fetch(`${api.url}/v1/microvms/${ID}/logs`, { headers: { authorization: `Bearer ${owner}` } });
    expect(logs.status).toBe(200);
    expect(await logs.text()).toContain("console-end");
    await truncate(machinePaths(api.engine.get(ID).dir).console, 16 * MiB);
    const [read, growthMiB] = await peakRssGrowth(async () => {
      const slow = await fetch(`${api.url}/v1/microvms/${ID}/logs`, { headers: { authorization: `Bearer ${owner}` } });
      const reader = slow.body!.getReader();
      await reader.read();
      await new Promise((r) => setTimeout(r, 5_000)); // not reading
      await reader.cancel();
      const fast = await fetch(`${api.url}/v1/microvms/${ID}/logs`, { headers: { authorization: `Bearer ${owner}` } });
      let bytes = 0;
      for await (const chunk of fast.body!) bytes += (chunk as Uint8Array).length;
      return bytes;
    });
    expect(read).toBeGreaterThanOrEqual(16 * MiB);
    expect(growthMiB).toBeLessThan(200);
    console.log(`16 MiB console log: RSS grew ${growthMiB.toFixed(0)} MiB at most`);
    await healthy();
  });
});

describe("request logs", () => {
  it("never hold a credential", async () => {
    await http("GET", `/v1/microvms/${ID}/terminal?access_token=ck_leak_query&cols=80`, { ...WS_HEADERS });
    await http("GET", `/v1/microvms/${ID}/http/?cocoon_token=et_leak_query`, {});
    await http("GET", `/v1/microvms/${ID}/terminal?ticket=tt_leak_ticket`, WS_HEADERS);
    await http("GET", "/v1/microvms", { Authorization: "Bearer ck_leak_header", Cookie: "cocoon_token_x=et_leak_cookie", "X-aws-proxy-auth": "leak_proxy_auth" });
    await new Promise((r) => setTimeout(r, 200));
    expect(logText).toContain("access_token=[REDACTED]");
    expect(logText).toContain("cocoon_token=[REDACTED]");
    for (const secret of ["ck_leak_query", "et_leak_query", "tt_leak_ticket", "ck_leak_header", "et_leak_cookie", "leak_proxy_auth", owner, TOKEN]) expect(logText).not.toContain(secret);
  });
});

