import {
  AccessDeniedException,
  ConflictException,
  CreateMicrovmShellAuthTokenCommand,
  GetMicrovmCommand,
  InsufficientCapacityException,
  LambdaMicrovmsServiceException,
  ListManagedMicrovmImagesCommand,
  ListManagedMicrovmImageVersionsCommand,
  ListMicrovmImagesCommand,
  ListMicrovmsCommand,
  ListTagsCommand,
  ResourceNotFoundException,
  ResumeMicrovmCommand,
  RunMicrovmCommand,
  ServiceQuotaExceededException,
  SuspendMicrovmCommand,
  TagResourceCommand,
  TerminateMicrovmCommand,
  UntagResourceCommand,
  ValidationException,
  type RunMicrovmCommandInput,
} from "@aws-sdk/client-lambda-microvms";
import { Sha256 } from "@smithy/core/checksum";
import { HttpRequest } from "@smithy/core/protocols";
import { SignatureV4 } from "@smithy/signature-v4";
import { describe, expect, it } from "vitest";
import WebSocket from "ws";
import { accountOf } from "../../src/api/aws/protocol.ts";
import { useApi } from "../support/api-fixture.ts";
import { awsClient, awsKey, thrown } from "./support.ts";

// The AWS door with the official client against a real server and real VMs
// of the managed `base` image: SigV4, every MicroVM operation, pagination,
// idempotency, tags, tokens, connectors and every exception class that needs
// no image build (test/aws/images.test.ts has those that do).

const api = await useApi({ capacity: { vcpus: 16, memoryMiB: 4 * 512 } });
const alice = await awsKey(api, "alice", ["microvm:*", "image:*"]);
const bob = await awsKey(api, "bob", ["microvm:*", "image:*"]);
const aws = awsClient(api, alice);
const once = awsClient(api, alice, { maxAttempts: 1 });

const run = (input: Partial<RunMicrovmCommandInput> = {}) => aws.send(new RunMicrovmCommand({ imageIdentifier: "base", ...input }));
/** A VM's ARN: the account is a stable 12-digit id of the tenant. */
const vmArn = (id: string) => `arn:aws:lambda:eu-west-3:${accountOf(alice.tenantId)}:microvm/${id}`;
const v1 = (id: string) => api.call("GET", `/v1/microvms/${id}`, { key: alice.apiKey });

/** A request signed by @smithy/signature-v4 itself, sent with fetch; `sendBody` replaces the signed body. */
async function signedFetch(
  method: string,
  path: string,
  opts: { body?: string; sendBody?: string; keyId?: string; secret?: string; date?: Date; contentSha256?: boolean } = {},
): Promise<{ status: number; type: string | null; body: any }> {
  const url = new URL(path, api.url);
  const signer = new SignatureV4({
    credentials: { accessKeyId: opts.keyId ?? alice.keyId, secretAccessKey: opts.secret ?? alice.apiKey },
    region: "us-east-1",
    service: "lambda",
    sha256: Sha256,
    applyChecksum: opts.contentSha256 ?? false,
  });
  const request = new HttpRequest({
    method,
    protocol: "http:",
    hostname: url.hostname,
    port: Number(url.port),
    path: url.pathname,
    query: Object.fromEntries(url.searchParams),
    headers: { host: url.host, ...(opts.body ? { "content-type": "application/json" } : {}) },
    body: opts.body,
  });
  const signed = await signer.sign(request, { signingDate: opts.date });
  const { host: _host, ...headers } = signed.headers;
  const res = await fetch(url, { method, headers, body: opts.sendBody ?? opts.body });
  return { status: res.status, type: res.headers.get("x-amzn-errortype"), body: await res.json().catch(() => undefined) };
}

describe("SigV4", () => {
  it("accepts the AWS SDK's signature and a boto3-style one (no X-Amz-Content-SHA256)", async () => {
    expect((await aws.send(new ListMicrovmsCommand({}))).items).toEqual([]);
    expect(await signedFetch("GET", "/2025-09-09/microvms?maxResults=5")).toMatchObject({ status: 200, body: { items: [] } });
    expect((await signedFetch("POST", "/2025-09-09/microvms", { body: JSON.stringify({ imageIdentifier: "nope" }) })).type).toBe("ResourceNotFoundException");
    // /v1's OpenAPI document stays /v1's.
    expect(Object.keys((await api.call("GET", "/v1/openapi.json")).body.paths).filter((p) => !p.startsWith("/v1"))).toEqual([]);
  });

  it("refuses a wrong secret, an unknown or revoked key, a missing signature and a swapped body with 403", async () => {
    const wrong = await thrown(() => awsClient(api, { keyId: alice.keyId, apiKey: `${alice.apiKey}x` }).send(new ListMicrovmsCommand({})));
    expect(wrong).toBeInstanceOf(LambdaMicrovmsServiceException);
    expect(wrong).toMatchObject({ name: "InvalidSignatureException", $metadata: { httpStatusCode: 403 } });
    const unknown = await thrown(() => awsClient(api, { keyId: "key-000000000000", apiKey: alice.apiKey }).send(new ListMicrovmsCommand({})));
    expect(unknown).toMatchObject({ name: "UnrecognizedClientException", $metadata: { httpStatusCode: 403 } });
    const carol = await awsKey(api, "carol", ["microvm:*"]);
    expect((await awsClient(api, carol).send(new ListMicrovmsCommand({}))).items).toEqual([]);
    expect((await api.call("DELETE", `/v1/keys/${carol.keyId}`, { key: api.adminKey })).status).toBe(200);
    expect(await thrown(() => awsClient(api, carol).send(new ListMicrovmsCommand({})))).toMatchObject({ name: "UnrecognizedClientException", $metadata: { httpStatusCode: 403 } });

    const unsigned = await fetch(`${api.url}/2025-09-09/microvms`);
    expect(unsigned.status).toBe(403);
    expect(unsigned.headers.get("x-amzn-errortype")).toBe("MissingAuthenticationTokenException");
    // The payload hash is signed: another body under the same signature is refused, with or without the header.
    for (const contentSha256 of [true, false]) {
      const swapped = await signedFetch("POST", "/2025-09-09/microvms", { body: JSON.stringify({ imageIdentifier: "base" }), sendBody: JSON.stringify({ imageIdentifier: "evil" }), contentSha256 });
      expect(swapped).toMatchObject({ status: 403, type: "InvalidSignatureException" });
    }
    expect(await signedFetch("GET", "/2025-09-09/microvms", { secret: bob.apiKey })).toMatchObject({ status: 403, type: "InvalidSignatureException" });
  });

  it("refuses a request signed more than 5 minutes ago or ahead; the client's own clock-skew correction then retries", async () => {
    const stale = await thrown(() => awsClient(api, alice, { maxAttempts: 1, systemClockOffset: -6 * 60_000 }).send(new ListMicrovmsCommand({})));
    expect(stale).toMatchObject({ name: "InvalidSignatureException", $metadata: { httpStatusCode: 403 } });
    expect(stale.message).toContain("Signature expired");
    const ahead = await thrown(() => awsClient(api, alice, { maxAttempts: 1, systemClockOffset: 6 * 60_000 }).send(new ListMicrovmsCommand({})));
    expect(ahead.message).toContain("Signature not yet current");
    expect(await signedFetch("GET", "/2025-09-09/microvms", { date: new Date(Date.now() - 10 * 60_000) })).toMatchObject({ status: 403, type: "InvalidSignatureException" });
    // With retries (the default), the SDK reads the server's Date, corrects its offset and succeeds.
    expect((await awsClient(api, alice, { systemClockOffset: -6 * 60_000 }).send(new ListMicrovmsCommand({}))).items).toEqual([]);
  });

  it("applies the key's permissions as /v1 does", async () => {
    const reader = await awsKey(api, "alice", ["image:read"]);
    const denied = await thrown(() => awsClient(api, reader).send(new RunMicrovmCommand({ imageIdentifier: "base" })));
    expect(denied).toBeInstanceOf(AccessDeniedException);
    expect(denied.$metadata.httpStatusCode).toBe(403);
    expect(denied.message).toContain("microvm:create");
    expect(await thrown(() => awsClient(api, reader).send(new ListMicrovmsCommand({})))).toBeInstanceOf(AccessDeniedException);
    expect((await awsClient(api, reader).send(new ListMicrovmImagesCommand({}))).items).toEqual([]);
  });
});

describe("MicroVMs", () => {
  const ids: string[] = [];

  it("runs VMs of the managed base, idempotently per clientToken, and lists them in pages", async () => {
    const a = await run({ clientToken: "run-a", maximumDurationInSeconds: 3600 });
    expect(a).toMatchObject({ state: "RUNNING", imageVersion: "1", maximumDurationInSeconds: 3600, imageArn: "arn:aws:lambda:eu-west-3:aws:microvm-image/base", egressNetworkConnectors: [] });
    expect(a.endpoint).toBe(`http://${a.microvmId}.vm.localhost:${new URL(api.url).port}/`);
    expect(a.startedAt).toBeInstanceOf(Date);
    expect(Math.abs(a.startedAt!.getTime() - Date.now())).toBeLessThan(120_000);
    // The same token and request: the same VM. The same token, another request: a conflict.
    expect((await run({ clientToken: "run-a", maximumDurationInSeconds: 3600 })).microvmId).toBe(a.microvmId);
    const reused = await thrown(() => run({ clientToken: "run-a", maximumDurationInSeconds: 60 }));
    expect(reused).toBeInstanceOf(ConflictException);
    expect(reused.$metadata.httpStatusCode).toBe(409);
    ids.push(a.microvmId!, (await run()).microvmId!, (await run()).microvmId!);

    const first = await aws.send(new ListMicrovmsCommand({ maxResults: 2 }));
    expect(first.items).toHaveLength(2);
    const second = await aws.send(new ListMicrovmsCommand({ maxResults: 2, nextToken: first.nextToken }));
    expect(second.nextToken).toBeUndefined();
    expect([...first.items!, ...second.items!].map((i) => i.microvmId).sort()).toEqual([...ids].sort());
    expect(second.items![0]).toMatchObject({ state: "RUNNING", imageVersion: "1" });
    expect((await aws.send(new ListMicrovmsCommand({ imageIdentifier: "base", imageVersion: "1" }))).items).toHaveLength(3);
    expect(await thrown(() => aws.send(new ListMicrovmsCommand({ nextToken: "garbage" })))).toBeInstanceOf(ValidationException);

    // By ARN; another tenant sees nothing of it, by id or ARN.
    const arn = vmArn(a.microvmId!);
    expect((await aws.send(new GetMicrovmCommand({ microvmIdentifier: arn }))).microvmId).toBe(a.microvmId);
    const bobs = awsClient(api, bob);
    expect(await thrown(() => bobs.send(new GetMicrovmCommand({ microvmIdentifier: a.microvmId })))).toBeInstanceOf(ResourceNotFoundException);
    expect(await thrown(() => bobs.send(new GetMicrovmCommand({ microvmIdentifier: arn })))).toBeInstanceOf(ResourceNotFoundException);
    expect(await thrown(() => bobs.send(new TerminateMicrovmCommand({ microvmIdentifier: a.microvmId })))).toBeInstanceOf(ResourceNotFoundException);
    expect((await bobs.send(new ListMicrovmsCommand({}))).items).toEqual([]);
  });

  it("refuses a VM the host has no capacity for", async () => {
    const fourth = await run();
    const full = await thrown(() => once.send(new RunMicrovmCommand({ imageIdentifier: "base" })));
    expect(full).toBeInstanceOf(InsufficientCapacityException);
    expect(full.message).toContain("host is at capacity");
    await aws.send(new TerminateMicrovmCommand({ microvmIdentifier: fourth.microvmId }));
  });

  it("suspends, resumes and terminates; a wrong-state call is a ConflictException", async () => {
    const id = ids[0]!;
    await aws.send(new SuspendMicrovmCommand({ microvmIdentifier: id }));
    expect((await aws.send(new GetMicrovmCommand({ microvmIdentifier: id }))).state).toBe("SUSPENDED");
    expect(await thrown(() => aws.send(new SuspendMicrovmCommand({ microvmIdentifier: id })))).toBeInstanceOf(ConflictException);
    await aws.send(new ResumeMicrovmCommand({ microvmIdentifier: id }));
    expect((await aws.send(new GetMicrovmCommand({ microvmIdentifier: id }))).state).toBe("RUNNING");
    const again = await thrown(() => aws.send(new ResumeMicrovmCommand({ microvmIdentifier: id })));
    expect(again).toBeInstanceOf(ConflictException);
    expect(again.message).toContain("it is RUNNING");
    await aws.send(new TerminateMicrovmCommand({ microvmIdentifier: id }));
    const ended = await aws.send(new GetMicrovmCommand({ microvmIdentifier: id }));
    expect(ended.state).toBe("TERMINATED");
    expect(ended.terminatedAt).toBeInstanceOf(Date);
  });

  it("tags a VM, up to 50 tags", async () => {
    const arn = vmArn(ids[1]!);
    await aws.send(new TagResourceCommand({ Resource: arn, Tags: { env: "prod", owner: "alice" } }));
    await aws.send(new UntagResourceCommand({ Resource: arn, TagKeys: ["owner", "absent"] }));
    expect((await aws.send(new ListTagsCommand({ Resource: arn }))).Tags).toEqual({ env: "prod" });
    expect((await api.call("GET", `/v1/microvms/${ids[1]}/tags`, { key: alice.apiKey })).body.tags).toEqual({ env: "prod" });
    const many = Object.fromEntries(Array.from({ length: 50 }, (_, i) => [`k${i}`, "v"]));
    const quota = await thrown(() => aws.send(new TagResourceCommand({ Resource: arn, Tags: many })));
    expect(quota).toBeInstanceOf(ServiceQuotaExceededException);
    expect(quota.$metadata.httpStatusCode).toBe(402);
    expect(await thrown(() => aws.send(new TagResourceCommand({ Resource: arn, Tags: { "aws:reserved": "x" } })))).toBeInstanceOf(ValidationException);
    expect(await thrown(() => awsClient(api, bob).send(new ListTagsCommand({ Resource: arn })))).toBeInstanceOf(ResourceNotFoundException);
  });

  it("opens the VM's shell with a shell auth token only", async () => {
    const id = ids[1]!;
    const { authToken } = await aws.send(new CreateMicrovmShellAuthTokenCommand({ microvmIdentifier: id, expirationInMinutes: 5 }));
    const token = authToken!["X-aws-proxy-auth"]!;
    const shell = new WebSocket(`${api.url.replace("http", "ws")}/v1/microvms/${id}/shell`, { headers: { "x-aws-proxy-auth": token } });
    let output = "";
    await new Promise<void>((resolve, reject) => {
      shell.on("open", () => shell.send("echo shell-$((6*7))\n"));
      shell.on("message", (data: Buffer) => {
        output += data.toString();
        if (output.includes("shell-42")) resolve();
      });
      shell.on("error", reject);
      setTimeout(() => reject(new Error(`no shell output: ${output}`)), 60_000);
    });
    shell.close();
    // Not for another VM, not a port token, not without one.
    expect((await api.call("GET", `/v1/microvms/${ids[2]}/shell`, { headers: { "x-aws-proxy-auth": token } })).status).toBe(401);
    const port = await api.call("POST", `/v1/microvms/${id}/auth-tokens`, { key: alice.apiKey, body: { ports: [{ allPorts: true }], expiresInMinutes: 5 } });
    expect(port.status).toBe(201);
    expect((await api.call("GET", `/v1/microvms/${id}/shell`, { headers: { "x-aws-proxy-auth": port.body.token } })).status).toBe(401);
    expect((await api.call("GET", `/v1/microvms/${id}/shell`)).status).toBe(401);
  });

  it("refuses bad input to the /v1 additions with a 400 naming the field", async () => {
    const id = ids[1]!;
    const bad = async (method: string, path: string, body: unknown, key = alice.apiKey) => {
      const res = await api.call(method, path, { key, body });
      expect(res.status, `${method} ${path} ${JSON.stringify(body)}: ${res.text}`).toBe(400);
      return res.body.error.message as string;
    };
    expect(await bad("POST", `/v1/microvms/${id}/auth-tokens`, { ports: [{ port: 0 }], expiresInMinutes: 5 })).toContain("ports");
    expect(await bad("POST", `/v1/microvms/${id}/auth-tokens`, { ports: [{ range: { startPort: 10, endPort: 5 } }], expiresInMinutes: 5 })).toContain("range.startPort 10 is above range.endPort 5");
    expect(await bad("POST", `/v1/microvms/${id}/auth-tokens`, { ports: [{ range: { startPort: 1, endPort: 300 } }, { port: 8080 }], expiresInMinutes: 5 })).toContain("at most 256 ports");
    expect(await bad("POST", `/v1/microvms/${id}/shell-auth-tokens`, { expiresInMinutes: 61 })).toContain("expiresInMinutes");
    expect(await bad("POST", `/v1/microvms/${id}/tags`, { tags: { "aws:x": "1" } })).toContain("aws: prefix is reserved");
    expect(await bad("POST", "/v1/microvms", { image: "base", network: { egress: "internet", egressConnectors: ["INTERNET_EGRESS"] } })).toContain("not both");
    expect(await bad("POST", "/v1/microvms", { image: "base", runHookPayload: "€".repeat(6000) })).toContain("runHookPayload");
    expect(await bad("POST", "/v1/microvms", { image: "base", idlePolicy: { terminateAfterSuspendedSeconds: -1 } })).toContain("terminateAfterSuspendedSeconds");
    expect(await bad("POST", "/v1/network-connectors", { name: "INTERNET_EGRESS", allow: ["a.org"] }, api.adminKey)).toContain("built in");
    expect(await bad("POST", "/v1/network-connectors", { name: "bad", allow: ["not a host!"] }, api.adminKey)).toContain("allow");
    expect(await bad("POST", "/v1/network-connectors", { name: "../x", allow: ["a.org"] }, api.adminKey)).toContain("name must match");
    expect((await api.call("PATCH", "/v1/images/nope", { key: alice.apiKey, body: { status: "BROKEN" } })).status).toBe(400);
    expect((await api.call("PATCH", "/v1/images/nope", { key: alice.apiKey, body: { status: "INACTIVE" } })).status).toBe(404);
  });

  it("maps egress connectors: INTERNET_EGRESS, operator-defined allow lists, none", async () => {
    for (const id of ids.slice(1)) await aws.send(new TerminateMicrovmCommand({ microvmIdentifier: id }));
    const created = await api.call("POST", "/v1/network-connectors", { key: api.adminKey, body: { name: "pypi", allow: ["pypi.org", "*.pythonhosted.org"] } });
    expect(created.status).toBe(201);
    expect((await api.call("POST", "/v1/network-connectors", { key: alice.apiKey, body: { name: "x", allow: ["a.org"] } })).status).toBe(403);
    const pypi = await run({ egressNetworkConnectors: ["pypi"] });
    expect(pypi.egressNetworkConnectors).toEqual(["pypi"]);
    expect((await v1(pypi.microvmId!)).body.network).toEqual({ egress: { allow: ["pypi.org", "*.pythonhosted.org"] }, egressConnectors: ["pypi"] });
    const internet = await run({ egressNetworkConnectors: ["INTERNET_EGRESS"] });
    expect((await v1(internet.microvmId!)).body.network.egress).toBe("internet");
    const unknown = await thrown(() => run({ egressNetworkConnectors: ["nope"] }));
    expect(unknown).toBeInstanceOf(ValidationException);
    expect(unknown.message).toContain("unknown network connector nope");
    for (const vm of [pypi, internet]) await aws.send(new TerminateMicrovmCommand({ microvmIdentifier: vm.microvmId }));
  });

  it("terminates a VM suspended longer than suspendedDurationSeconds (also /v1's terminateAfterSuspendedSeconds)", async () => {
    // Created through /v1, driven through the AWS door: one core behind both.
    const body = { image: "base", idlePolicy: { terminateAfterSuspendedSeconds: 2 }, clientToken: "v1-token" };
    const created = await api.call("POST", "/v1/microvms", { key: alice.apiKey, body });
    expect(created.status).toBe(201);
    const id = created.body.microVmId as string;
    // /v1 has the same clientToken idempotency.
    expect((await api.call("POST", "/v1/microvms", { key: alice.apiKey, body })).body.microVmId).toBe(id);
    expect((await api.call("POST", "/v1/microvms", { key: alice.apiKey, body: { ...body, maxRuntimeSeconds: 60 } })).status).toBe(409);
    expect((await aws.send(new GetMicrovmCommand({ microvmIdentifier: id }))).idlePolicy).toEqual({ maxIdleDurationSeconds: 900, suspendedDurationSeconds: 2, autoResumeEnabled: true });
    await aws.send(new SuspendMicrovmCommand({ microvmIdentifier: id }));
    const deadline = Date.now() + 60_000;
    while ((await aws.send(new GetMicrovmCommand({ microvmIdentifier: id }))).state !== "TERMINATED") {
      if (Date.now() > deadline) throw new Error("still not terminated");
      await new Promise((r) => setTimeout(r, 250));
    }
    const events = (await api.call("GET", `/v1/microvms/${id}/events`, { key: alice.apiKey })).body.events as { type: string; message: string }[];
    expect(events.at(-1)).toMatchObject({ type: "terminated", message: "terminated (suspended for 2 s)" });
  });

  it("refuses invalid input with a ValidationException naming the field", async () => {
    const cases: [Partial<RunMicrovmCommandInput>, string][] = [
      [{ idlePolicy: { maxIdleDurationSeconds: 30, suspendedDurationSeconds: 0, autoResumeEnabled: true } }, "maxIdleDurationSeconds"],
      [{ maximumDurationInSeconds: 28_801 }, "maximumDurationInSeconds"],
      [{ runHookPayload: "x".repeat(16 * 1024 + 1) }, "runHookPayload"],
      [{ runHookPayload: "€".repeat(6000) }, "runHookPayload holds at most 16384 bytes"],
      [{ imageVersion: "one" }, "imageVersion"],
      [{ imageIdentifier: "arn:aws:lambda:eu-west-3:aws:microvm/vm-1" }, "names a microvm"],
      [{ logging: { disabled: {}, cloudWatch: {} } as never }, "logging"],
    ];
    for (const [input, text] of cases) {
      const err = await thrown(() => run(input));
      expect(err, text).toBeInstanceOf(ValidationException);
      expect(err.$metadata.httpStatusCode).toBe(400);
      expect(err.message).toContain(text);
    }
    // Hostile bodies: not JSON, an unknown field, far too large; each a 400, never a 500.
    expect(await signedFetch("POST", "/2025-09-09/microvms", { body: "{not json" })).toMatchObject({ status: 400, type: "ValidationException" });
    const bogus = await signedFetch("POST", "/2025-09-09/microvms", { body: JSON.stringify({ imageIdentifier: "base", bogus: 1 }) });
    expect(bogus).toMatchObject({ status: 400, type: "ValidationException" });
    expect(bogus.body.message).toContain("unknown field bogus");
    expect(await signedFetch("POST", "/2025-09-09/microvms", { body: JSON.stringify({ imageIdentifier: "x".repeat(2 * 1024 * 1024) }) })).toMatchObject({ status: 400, type: "ValidationException" });
    expect(await thrown(() => run({ imageIdentifier: "no-such-image" }))).toBeInstanceOf(ResourceNotFoundException);
    expect(await thrown(() => run({ imageIdentifier: "base", imageVersion: "2" }))).toBeInstanceOf(ResourceNotFoundException);
  });
});

describe("managed images", () => {
  it("lists base and its version", async () => {
    const managed = await aws.send(new ListManagedMicrovmImagesCommand({}));
    expect(managed.items!.map((i) => i.imageArn)).toContain("arn:aws:lambda:eu-west-3:aws:microvm-image/base");
    expect(managed.items![0]!.createdAt).toBeInstanceOf(Date);
    const versions = await aws.send(new ListManagedMicrovmImageVersionsCommand({ imageIdentifier: "arn:aws:lambda:eu-west-3:aws:microvm-image/base" }));
    expect(versions.items).toEqual([expect.objectContaining({ imageVersion: "1", status: "AVAILABLE" })]);
    expect(await thrown(() => aws.send(new ListManagedMicrovmImageVersionsCommand({ imageIdentifier: "gentoo" })))).toBeInstanceOf(ResourceNotFoundException);
  });
});
