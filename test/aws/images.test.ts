import {
  ConflictException,
  CreateMicrovmAuthTokenCommand,
  CreateMicrovmImageCommand,
  DeleteMicrovmImageCommand,
  DeleteMicrovmImageVersionCommand,
  GetMicrovmCommand,
  GetMicrovmImageBuildCommand,
  GetMicrovmImageCommand,
  GetMicrovmImageVersionCommand,
  ListMicrovmImageBuildsCommand,
  ListMicrovmImagesCommand,
  ListMicrovmImageVersionsCommand,
  ListMicrovmsCommand,
  ListTagsCommand,
  ResourceNotFoundException,
  ResumeMicrovmCommand,
  RunMicrovmCommand,
  SuspendMicrovmCommand,
  TagResourceCommand,
  TerminateMicrovmCommand,
  ThrottlingException,
  UpdateMicrovmImageCommand,
  UpdateMicrovmImageVersionCommand,
  UntagResourceCommand,
  ValidationException,
  type CreateMicrovmImageCommandInput,
} from "@aws-sdk/client-lambda-microvms";
import { readFile, mkdtemp, rm } from "node:fs/promises";
import { request } from "node:http";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { AccessTokens } from "../../src/router/access-tokens.ts";
import { useApi } from "../support/api-fixture.ts";
import { TEST_ROOT } from "../support/paths.ts";
import { makeZip } from "../support/zip.ts";
import { awsClient, awsKey, thrown } from "./support.ts";

// Images through the official client, built from a zip in S3 on the managed
// `base`, with lifecycle hooks answered by a real app in the guest
// (hook-app/hooks.pl). One build slot and one queue place, so a third build
// is throttled while two are in flight.

const { default: S3rver } = await import("s3rver");
const s3Dir = await mkdtemp(join(TEST_ROOT, "s3-"));
const s3 = new S3rver({ port: 0, address: "127.0.0.1", silent: true, directory: s3Dir, configureBuckets: [{ name: "code" }] });
const s3Endpoint = `http://127.0.0.1:${(await s3.run()).port}`;
const savedEnv = { ...process.env };
Object.assign(process.env, { AWS_ACCESS_KEY_ID: "S3RVER", AWS_SECRET_ACCESS_KEY: "S3RVER" });

const api = await useApi({
  capacity: { vcpus: 8, memoryMiB: 4096 },
  images: { readyTimeoutMs: 90_000, maxConcurrentBuilds: 1, maxQueuedBuilds: 1, s3: { endpoint: s3Endpoint, region: "us-east-1", forcePathStyle: true } },
});
const alice = await awsKey(api, "alice", ["microvm:*", "image:*"]);
// The operator lets alice's code URIs read the test bucket (SECURITY.md: s3Allow).
await api.call("PATCH", "/v1/tenants/alice", { key: api.adminKey, body: { s3Allow: ["code/"] } });
const aws = awsClient(api, alice);
const region = "eu-west-3";
const domainPort = new URL(api.url).port;

const APP = new URL("./hook-app/", import.meta.url).pathname;
const zip = makeZip([
  { name: "Dockerfile", data: await readFile(join(APP, "Dockerfile")) },
  { name: "hooks.pl", data: await readFile(join(APP, "hooks.pl")) },
]);
{
  const { S3Client, PutObjectCommand } = await import("@aws-sdk/client-s3");
  const client = new S3Client({ endpoint: s3Endpoint, region: "us-east-1", forcePathStyle: true });
  await client.send(new PutObjectCommand({ Bucket: "code", Key: "hooked.zip", Body: zip }));
  client.destroy();
}

afterAll(async () => {
  process.env = savedEnv;
  await s3.close();
  await rm(s3Dir, { recursive: true, force: true });
});

const BASE_ARN = `arn:aws:lambda:${region}:aws:microvm-image/base`;
const hooked = (extra: Partial<CreateMicrovmImageCommandInput> = {}): CreateMicrovmImageCommandInput => ({
  name: "hooked",
  baseImageArn: BASE_ARN,
  buildRoleArn: "arn:aws:iam::123456789012:role/ignored",
  codeArtifact: { uri: "s3://code/hooked.zip" },
  description: "hooks test app",
  logging: { cloudWatch: { logGroup: "ignored" } },
  resources: [{ minimumMemoryInMiB: 512 }],
  environmentVariables: { GREETING: "hi" },
  hooks: {
    port: 8081,
    microvmHooks: { run: "ENABLED", suspend: "ENABLED", resume: "ENABLED", resumeTimeoutInSeconds: 1, terminate: "ENABLED" },
    microvmImageHooks: { ready: "ENABLED", readyTimeoutInSeconds: 60, validate: "ENABLED" },
  },
  tags: { team: "blue" },
  ...extra,
});

async function waitVersion(version: string): Promise<Record<string, any>> {
  const deadline = Date.now() + 600_000;
  for (;;) {
    const v = await aws.send(new GetMicrovmImageVersionCommand({ imageIdentifier: "hooked", imageVersion: version }));
    if (v.state !== "PENDING" && v.state !== "IN_PROGRESS") return v;
    if (Date.now() > deadline) throw new Error(`version ${version} still ${v.state}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

/** GET on a VM's endpoint host (`{id}.vm.localhost` or `{port}-{id}.vm.localhost`), through the API port. */
function endpointGet(host: string, path: string, headers: Record<string, string> = {}): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port: Number(domainPort), path, headers: { host: `${host}:${domainPort}`, ...headers } }, (res) => {
      let text = "";
      res.on("data", (c: Buffer) => (text += c.toString()));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, text }));
    });
    req.on("error", reject);
    req.end();
  });
}

const events = async (id: string) => (await api.call("GET", `/v1/microvms/${id}/events`, { key: alice.apiKey })).body.events as { type: string; message: string }[];

describe("images, versions and builds", () => {
  let v1: Record<string, any>;
  let v2: Record<string, any>;

  it("creates an image from s3:// on the managed base, idempotently, and throttles a third build while two are in flight", async () => {
    const created = await aws.send(new CreateMicrovmImageCommand(hooked({ clientToken: "create-hooked-1" })));
    expect(created).toMatchObject({ name: "hooked", imageVersion: "1", state: "CREATING", baseImageArn: BASE_ARN, codeArtifact: { uri: "s3://code/hooked.zip" } });
    expect(created.imageArn).toMatch(new RegExp(`^arn:aws:lambda:${region}:\\d{12}:microvm-image/hooked$`));
    expect(created.createdAt).toBeInstanceOf(Date);
    // A retry with the same token is the same version, not a second build.
    const retried = await aws.send(new CreateMicrovmImageCommand(hooked({ clientToken: "create-hooked-1" })));
    expect(retried.imageVersion).toBe("1");
    expect(await thrown(() => aws.send(new CreateMicrovmImageCommand(hooked({ clientToken: "create-hooked-1", description: "another" }))))).toBeInstanceOf(ConflictException);
    // Create again under the same name is a conflict: Update makes versions.
    expect(await thrown(() => aws.send(new CreateMicrovmImageCommand(hooked())))).toBeInstanceOf(ConflictException);

    // Version 2's /validate answers 500: its build must fail with that reason.
    const { name: _name, tags: _tags, ...definition } = hooked({ environmentVariables: { VALIDATE_STATUS: "500" } });
    const updated = await aws.send(new UpdateMicrovmImageCommand({ ...definition, imageIdentifier: created.imageArn }));
    expect(updated).toMatchObject({ imageVersion: "2", state: "UPDATING" });

    const throttled = await thrown(() => awsClient(api, alice, { maxAttempts: 1 }).send(new CreateMicrovmImageCommand(hooked({ name: "third" }))));
    expect(throttled).toBeInstanceOf(ThrottlingException);
    expect(throttled.$metadata.httpStatusCode).toBe(429);

    v1 = await waitVersion("1");
    v2 = await waitVersion("2");
  }, 900_000);

  it("refuses what Cocoon cannot build: ARM_64 on this host, a Dockerfile FROM another base, an unknown base", async () => {
    const arm = await thrown(() => aws.send(new CreateMicrovmImageCommand(hooked({ name: "arm", cpuConfigurations: [{ architecture: "ARM_64" }] }))));
    expect(arm).toBeInstanceOf(ValidationException);
    expect(arm.message).toContain("ARM_64 is not available");
    const { S3Client, PutObjectCommand } = await import("@aws-sdk/client-s3");
    const client = new S3Client({ endpoint: s3Endpoint, region: "us-east-1", forcePathStyle: true });
    await client.send(new PutObjectCommand({ Bucket: "code", Key: "scratch.zip", Body: makeZip([{ name: "Dockerfile", data: "FROM scratch\nCOPY x /x\n" }, { name: "x", data: "x" }]) }));
    client.destroy();
    const scratch = await thrown(() => aws.send(new CreateMicrovmImageCommand(hooked({ name: "scratchy", codeArtifact: { uri: "s3://code/scratch.zip" } }))));
    expect(scratch).toBeInstanceOf(ValidationException);
    expect(scratch.message).toContain("names another base than the managed image base");
    const unknown = await thrown(() => aws.send(new CreateMicrovmImageCommand(hooked({ name: "nobase", baseImageArn: `arn:aws:lambda:${region}:aws:microvm-image/gentoo` }))));
    expect(unknown).toBeInstanceOf(ValidationException);
    const missing = await thrown(() => aws.send(new CreateMicrovmImageCommand(hooked({ name: "nocode", codeArtifact: { uri: "s3://code/nope.zip" } }))));
    expect(missing).toBeInstanceOf(ValidationException);
    expect(missing.message).toContain("codeArtifact.uri");
  });

  it("reports versions, builds and the image's state; a failing /validate fails the build with its answer", async () => {
    expect(v1).toMatchObject({
      state: "SUCCESSFUL",
      status: "ACTIVE",
      imageVersion: "1",
      buildRoleArn: "arn:aws:iam::123456789012:role/ignored",
      logging: { cloudWatch: { logGroup: "ignored" } },
      environmentVariables: { GREETING: "hi" },
      resources: [{ minimumMemoryInMiB: 512 }],
      tags: { team: "blue" },
      hooks: { port: 8081, microvmHooks: { run: "ENABLED", resumeTimeoutInSeconds: 1 }, microvmImageHooks: { ready: "ENABLED", validate: "ENABLED" } },
    });
    expect(v2.state).toBe("FAILED");
    expect(v2.stateReason).toContain("the validate hook failed: POST /validate answered 500");
    expect(v2.stateReason).toContain("the schema is missing");

    const image = await aws.send(new GetMicrovmImageCommand({ imageIdentifier: "hooked" }));
    expect(image).toMatchObject({ name: "hooked", state: "UPDATE_FAILED", latestActiveImageVersion: "1", latestFailedImageVersion: "2", tags: { team: "blue" } });
    await aws.send(new TagResourceCommand({ Resource: image.imageArn, Tags: { stage: "test" } }));
    expect((await aws.send(new ListTagsCommand({ Resource: image.imageArn }))).Tags).toEqual({ team: "blue", stage: "test" });
    await aws.send(new UntagResourceCommand({ Resource: image.imageArn, TagKeys: ["stage"] }));
    expect((await api.call("GET", "/v1/images/hooked/tags", { key: alice.apiKey })).body.tags).toEqual({ team: "blue" });

    const builds = await aws.send(new ListMicrovmImageBuildsCommand({ imageIdentifier: "hooked", imageVersion: "2" }));
    expect(builds.items).toHaveLength(1);
    expect(builds.items![0]).toMatchObject({ imageVersion: "2", buildState: "FAILED", architecture: "X86_64" });
    const build = await aws.send(new GetMicrovmImageBuildCommand({ imageIdentifier: "hooked", imageVersion: "1", buildId: (await aws.send(new ListMicrovmImageBuildsCommand({ imageIdentifier: "hooked", imageVersion: "1" }))).items![0]!.buildId }));
    expect(build.buildState).toBe("SUCCESSFUL");
    expect(build.snapshotBuild!.memorySnapshotSizeInBytes).toBeGreaterThan(0);
    expect(await thrown(() => aws.send(new GetMicrovmImageBuildCommand({ imageIdentifier: "hooked", imageVersion: "1", buildId: "img-nope" })))).toBeInstanceOf(ResourceNotFoundException);
    expect((await aws.send(new ListMicrovmImageBuildsCommand({ imageIdentifier: "hooked", imageVersion: "1", architecture: "ARM_64" }))).items).toEqual([]);

    // Pages of one version each.
    const first = await aws.send(new ListMicrovmImageVersionsCommand({ imageIdentifier: "hooked", maxResults: 1 }));
    const second = await aws.send(new ListMicrovmImageVersionsCommand({ imageIdentifier: "hooked", maxResults: 1, nextToken: first.nextToken }));
    expect([...first.items!, ...second.items!].map((v) => v.imageVersion)).toEqual(["1", "2"]);
    expect(second.nextToken).toBeUndefined();
    const listed = await aws.send(new ListMicrovmImagesCommand({ nameFilter: "hook" }));
    expect(listed.items!.map((i) => i.name)).toEqual(["hooked"]);
    expect((await aws.send(new ListMicrovmImagesCommand({ nameFilter: "zzz" }))).items).toEqual([]);
  });
});

describe("a VM of the image: hooks, port tokens, versions", () => {
  let vmId = "";

  it("passes through PENDING while its /run hook gets the runHookPayload, then RUNNING", async () => {
    const payload = JSON.stringify({ session: "s-42" });
    const running = aws.send(new RunMicrovmCommand({ imageIdentifier: "hooked", imageVersion: "1", runHookPayload: payload, idlePolicy: { maxIdleDurationSeconds: 600, suspendedDurationSeconds: 0, autoResumeEnabled: true } }));
    // The hook app answers /run after 2 s: meanwhile the VM is listed PENDING.
    let pending: string | undefined;
    const deadline = Date.now() + 60_000;
    while (!pending && Date.now() < deadline) {
      const item = (await aws.send(new ListMicrovmsCommand({ imageIdentifier: "hooked" }))).items?.[0];
      if (item) pending = item.state;
      else await new Promise((r) => setTimeout(r, 50));
    }
    expect(pending).toBe("PENDING");
    const vm = await running;
    vmId = vm.microvmId!;
    expect(vm).toMatchObject({ state: "RUNNING", imageVersion: "1", imageArn: `arn:aws:lambda:${region}:${vm.imageArn!.split(":")[4]}:microvm-image/hooked` });
    const log = await appHooks(vmId);
    // The build's hooks left their calls in the snapshot; the launch added /run with the payload.
    expect(log).toContain("/ready \n");
    expect(log).toContain("/validate \n");
    expect(log).toContain(`/run ${payload}\n`);
    expect((await events(vmId)).some((e) => e.type === "hook" && /POST \/run answered 200/.test(e.message))).toBe(true);
  });

  it("opens each port only to tokens for it, until they expire", async () => {
    const token = async (allowedPorts: any[]) =>
      (await aws.send(new CreateMicrovmAuthTokenCommand({ microvmIdentifier: vmId, expirationInMinutes: 5, allowedPorts }))).authToken!["X-aws-proxy-auth"]!;
    const forApp = await token([{ port: 8080 }]);
    const forOther = await token([{ port: 9090 }]);
    const forRange = await token([{ range: { startPort: 8000, endPort: 8100 } }]);
    const forAll = await token([{ allPorts: {} }]);
    const host = `8080-${vmId}.vm.localhost`;
    for (const t of [forApp, forRange, forAll]) expect(await endpointGet(host, "/", { "x-aws-proxy-auth": t })).toEqual({ status: 200, text: "app on 8080\n" });
    expect((await endpointGet(`${vmId}.vm.localhost`, "/", { "x-aws-proxy-auth": forApp })).status).toBe(200);
    // Without a credential for the port the VM's endpoint does not exist (404, as for another tenant's VM).
    expect((await endpointGet(host, "/", { "x-aws-proxy-auth": forOther })).status).toBe(404);
    expect((await endpointGet(host, "/", { "x-aws-proxy-auth": `${forApp}x` })).status).toBe(404);
    expect((await endpointGet(host, "/")).status).toBe(404);
    // The expiry is in the token, signed: the same token is refused once it has passed.
    const tokens = new AccessTokens(api.secrets.derive("endpoint-access-tokens"));
    expect(tokens.verify(forApp, vmId, 8080)).toBe(true);
    expect(tokens.verify(forApp, vmId, 8080, new Date(Date.now() + 5 * 60_000 + 1000))).toBe(false);
    for (const expirationInMinutes of [0, 61]) {
      expect(await thrown(() => aws.send(new CreateMicrovmAuthTokenCommand({ microvmIdentifier: vmId, expirationInMinutes, allowedPorts: [{ port: 8080 }] })))).toBeInstanceOf(ValidationException);
    }
  });

  it("calls /suspend before a suspend and /resume after a resume; a failing or slow hook is an event", async () => {
    await aws.send(new SuspendMicrovmCommand({ microvmIdentifier: vmId }));
    expect((await aws.send(new GetMicrovmCommand({ microvmIdentifier: vmId }))).state).toBe("SUSPENDED");
    await aws.send(new ResumeMicrovmCommand({ microvmIdentifier: vmId }));
    expect((await aws.send(new GetMicrovmCommand({ microvmIdentifier: vmId }))).state).toBe("RUNNING");
    const ev = await events(vmId);
    expect(ev.find((e) => e.type === "hook-failed" && e.message.startsWith("POST /suspend"))?.message).toContain("answered 500");
    expect(ev.find((e) => e.type === "hook-failed" && e.message.startsWith("POST /resume"))?.message).toMatch(/timed out after \d+ ms/);
    const log = await appHooks(vmId);
    expect(log).toContain("/suspend \n");
    expect(log).toContain("/resume \n");
  });

  it("never launches an INACTIVE version, and refuses to delete an image in use", async () => {
    await aws.send(new UpdateMicrovmImageVersionCommand({ imageIdentifier: "hooked", imageVersion: "1", status: "INACTIVE" }));
    expect((await aws.send(new GetMicrovmImageVersionCommand({ imageIdentifier: "hooked", imageVersion: "1" }))).status).toBe("INACTIVE");
    const refused = await thrown(() => aws.send(new RunMicrovmCommand({ imageIdentifier: "hooked" })));
    expect(refused).toBeInstanceOf(ConflictException);
    expect(refused.message).toContain("INACTIVE");
    // The running VM of that version keeps running.
    expect((await aws.send(new GetMicrovmCommand({ microvmIdentifier: vmId }))).state).toBe("RUNNING");
    await aws.send(new UpdateMicrovmImageVersionCommand({ imageIdentifier: "hooked", imageVersion: "1", status: "ACTIVE" }));
    expect(await thrown(() => aws.send(new DeleteMicrovmImageCommand({ imageIdentifier: "hooked" })))).toBeInstanceOf(ConflictException);
  });

  it("calls /terminate before a terminate, then deletes versions and the image with its tags", async () => {
    await aws.send(new TerminateMicrovmCommand({ microvmIdentifier: vmId }));
    expect((await events(vmId)).some((e) => e.type === "hook" && e.message.startsWith("POST /terminate answered 200"))).toBe(true);
    expect(await aws.send(new DeleteMicrovmImageVersionCommand({ imageIdentifier: "hooked", imageVersion: "2" }))).toMatchObject({ imageVersion: "2", state: "DELETED" });
    const arn = (await aws.send(new GetMicrovmImageCommand({ imageIdentifier: "hooked" }))).imageArn!;
    expect(await aws.send(new DeleteMicrovmImageCommand({ imageIdentifier: arn }))).toMatchObject({ state: "DELETED" });
    expect(await thrown(() => aws.send(new GetMicrovmImageCommand({ imageIdentifier: "hooked" })))).toBeInstanceOf(ResourceNotFoundException);
    expect(await thrown(() => aws.send(new ListTagsCommand({ Resource: arn })))).toBeInstanceOf(ResourceNotFoundException);
  });
});

/** What the app's hook listener received, read from the app port with the VM's endpoint token. */
async function appHooks(id: string): Promise<string> {
  const vm = await api.call("GET", `/v1/microvms/${id}`, { key: alice.apiKey });
  const res = await endpointGet(`${id}.vm.localhost`, "/hooks", { authorization: `Bearer ${vm.body.endpoint.token}` });
  expect(res.status).toBe(200);
  return res.text;
}
