import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { committedApiTypes, generateApiTypes, openApiDocument, withInProcessApi } from "../../scripts/api-types.ts";
import { ERROR_CODES } from "../../src/errors.ts";
import { IMAGE_STATES, MICROVM_STATES } from "../../src/store/schema.ts";

/*
 * The contract between the server and its clients: the SDK's and the
 * console's types are generated from the OpenAPI document the server serves.
 * Change a route's schema, then `npm run gen:api`, and commit both.
 */
describe("the OpenAPI contract", () => {
  it("the committed API types are those generated from the document the server serves (else: npm run gen:api)", async () => {
    expect(await committedApiTypes()).toBe(await generateApiTypes());
  });

  it("documents every /v1 route with its answer and the error envelope", async () => {
    const document = (await openApiDocument()) as unknown as {
      paths: Record<string, Record<string, { responses: Record<string, { content?: Record<string, { schema: unknown }> }> }>>;
      components: { schemas: Record<string, { enum?: string[] }> };
    };
    const undocumented: string[] = [];
    for (const [path, operations] of Object.entries(document.paths)) {
      for (const [method, operation] of Object.entries(operations)) {
        const ok = Object.keys(operation.responses).filter((status) => status.startsWith("2"));
        // WebSocket routes answer with an upgrade (101), not a body.
        if (ok.length === 0 && !/\/(terminal|shell)$/.test(path)) undocumented.push(`${method.toUpperCase()} ${path}`);
        expect(operation.responses["4XX"]?.content?.["application/json"]?.schema, `${method} ${path}`).toEqual({ $ref: "#/components/schemas/ErrorEnvelope" });
      }
    }
    expect(undocumented).toEqual([]);
    expect(document.components.schemas.MicroVmState!.enum).toEqual([...MICROVM_STATES]);
    expect(document.components.schemas.ImageState!.enum).toEqual([...IMAGE_STATES]);
    expect(document.components.schemas.ErrorCode!.enum).toEqual(Object.keys(ERROR_CODES));
  });

  // The Python SDK has no generator: its copies of the enumerations are read here and must equal the document's.
  it("the Python SDK's states and error codes are the document's", async () => {
    const sdk = join(import.meta.dirname, "..", "..", "packages", "python-sdk", "cocoon");
    const types = await readFile(join(sdk, "types.py"), "utf8");
    const errors = await readFile(join(sdk, "errors.py"), "utf8");
    const literal = (name: string) => [...new RegExp(`^${name} = Literal\\[([^\\]]*)\\]`, "m").exec(types)![1]!.matchAll(/"([^"]+)"/g)].map((m) => m[1]);
    expect(literal("MicroVmState")).toEqual([...MICROVM_STATES]);
    expect(literal("ImageState")).toEqual([...IMAGE_STATES]);
    const byCode = /^_BY_CODE[^{]*\{([^}]*)\}/m.exec(errors)![1]!;
    expect([...byCode.matchAll(/^\s*"([A-Za-z]+)":/gm)].map((m) => m[1]).sort()).toEqual(Object.keys(ERROR_CODES).sort());
  });

  it("the routes that need no VM answer as documented (each answer is checked against its schema)", async () => {
    await withInProcessApi({ checkAnswers: true }, async (app, adminKey) => {
      const call = async (method: "GET" | "POST" | "PUT" | "PATCH" | "DELETE", url: string, key: string | undefined, payload?: object) => {
        const res = await app.inject({ method, url, payload, headers: key ? { authorization: `Bearer ${key}` } : {} });
        return { status: res.statusCode, body: res.json() as Record<string, any> };
      };
      const admin = (method: Parameters<typeof call>[0], url: string, payload?: object) => call(method, url, adminKey, payload);
      expect((await call("GET", "/v1/health", undefined)).status).toBe(200);
      expect((await admin("POST", "/v1/tenants", { name: "acme", quotas: { images: 5 } })).status).toBe(201);
      expect((await admin("GET", "/v1/tenants")).status).toBe(200);
      expect((await admin("PATCH", "/v1/tenants/acme", { s3Allow: ["bucket/"] })).body.s3Allow).toEqual(["bucket/"]);
      const created = await admin("POST", "/v1/keys", { tenant: "acme", permissions: ["microvm:*", "image:*"] });
      expect(created.status).toBe(201);
      expect((await admin("GET", "/v1/keys")).status).toBe(200);
      const key = created.body.apiKey as string;
      expect((await call("GET", "/v1/microvms?limit=5", key)).body).toEqual({ microVms: [] });
      expect((await call("GET", "/v1/images", key)).status).toBe(200);
      expect((await call("GET", "/v1/images/base", key)).body.state).toBe("READY");
      expect((await call("PUT", "/v1/registries/ghcr.io", key, { username: "me", password: "secret" })).status).toBe(200);
      expect((await call("GET", "/v1/registries", key)).body.registries).toHaveLength(1);
      expect((await call("GET", "/v1/registries/ghcr.io", key)).status).toBe(200);
      expect((await call("DELETE", "/v1/registries/ghcr.io", key)).status).toBe(200);
      expect((await admin("POST", "/v1/network-connectors", { name: "debian", allow: ["*.debian.org"] })).status).toBe(201);
      expect((await admin("GET", "/v1/network-connectors")).status).toBe(200);
      expect((await admin("DELETE", "/v1/network-connectors/debian")).status).toBe(200);
      // Errors, in the envelope.
      expect(await call("GET", "/v1/microvms/vm-nope", key)).toMatchObject({ status: 404, body: { error: { code: "NotFound" } } });
      expect(await call("POST", "/v1/microvms", key, { vcpus: 99 })).toMatchObject({ status: 400, body: { error: { code: "ValidationError" } } });
      expect(await call("GET", "/v1/microvms", undefined)).toMatchObject({ status: 401, body: { error: { code: "Unauthorized" } } });
      expect(await call("GET", "/v1/keys", key)).toMatchObject({ status: 403, body: { error: { code: "Forbidden" } } });
      expect(await call("POST", "/v1/images", key, { name: "app" })).toMatchObject({
        status: 400,
        body: { error: { code: "ValidationError", message: "body must have required property 'codeUri'", details: { field: "body" } } },
      });
      // A timeout for one hook is enough (the others keep their defaults): the body passes, and the code URI is what is refused.
      const oneTimeout = { name: "app", codeUri: "s3://elsewhere/app.zip", hooks: { port: 8080, timeoutSeconds: { ready: 5 } } };
      expect(await call("POST", "/v1/images", key, oneTimeout)).toMatchObject({ status: 403, body: { error: { code: "Forbidden", details: { field: "codeUri" } } } });
      expect((await admin("DELETE", `/v1/keys/${created.body.keyId as string}`)).body).toEqual({ keyId: created.body.keyId, revoked: true });
    });
  });
});
