import { request } from "node:http";
import WebSocket from "ws";
import { describe, expect, it, onTestFinished } from "vitest";
import { useApi } from "../support/api-fixture.ts";
import { startApp, webSocketApp } from "../support/guest-apps.ts";

const api = await useApi({ policyIntervalMs: 250 });
const key = await api.tenantKey("erin");
const other = await api.tenantKey("frank");
/** A key of erin's tenant that may read VMs but not reach their endpoints. */
const readOnly = await api.tenantKey("erin", ["microvm:read"]);

/**
 * A counting HTTP server for the base image, which has perl-base but no
 * python: each answer says how many requests it has served and the path.
 */
const counterApp = (port: number) => `nohup perl -MIO::Socket::INET -e '
  my $s = IO::Socket::INET->new(LocalPort => ${port}, Listen => 16, ReuseAddr => 1) or die;
  my $n = 0;
  while (my $c = $s->accept) {
    my $first = <$c>; next unless defined $first; # a readiness probe: no request
    while (my $l = <$c>) { last if $l eq "\\r\\n" }
    $n++; my $path = (split / /, $first)[1];
    my $b = "count=$n path=$path\\n";
    print $c "HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nSet-Cookie: app=1; Domain=vm.localhost\\r\\nSet-Cookie: cocoon_token_x=planted\\r\\nContent-Length: " . length($b) . "\\r\\nConnection: close\\r\\n\\r\\n$b";
    close $c;
  }' > /dev/null 2>&1 &`;
const COUNTER_APP = counterApp(8080);

/** A WebSocket echo server on port 8080. */
const WS_ECHO_APP = webSocketApp(8080, `my $o = "echo:$p"; print $c pack("CC", 0x81, length $o) . $o;`);

async function createApp(body: Record<string, unknown> = {}, app = COUNTER_APP) {
  const res = await api.call("POST", "/v1/microvms", { key, body: { image: "base", appPort: 8080, idlePolicy: { suspendAfterSeconds: 0 }, ...body } });
  expect(res.status, res.text).toBe(201);
  const vm = res.body as { microVmId: string; endpoint: { url: string; token: string } };
  // The host admits 8 vCPUs: each test's VMs end with it.
  onTestFinished(async () => void (await api.call("DELETE", `/v1/microvms/${vm.microVmId}`, { key })));
  await startApp(api, key, vm.microVmId, app, 8080);
  return vm;
}

type Answer = { status: number; body: string; headers: Record<string, unknown> };

/** GET through the server with an explicit Host header (curl-style: *.vm.localhost maps to loopback). */
function get(path: string, headers: Record<string, string>, method = "GET"): Promise<Answer> {
  const { port } = new URL(api.url);
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path, headers, method }, (res) => {
      let body = "";
      res.on("data", (d: Buffer) => (body += d.toString()));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
    });
    req.on("error", reject);
    req.end();
  });
}

/** What a client gets for a VM it may not reach: exactly what it gets for one that does not exist. */
async function expectHidden(answer: Promise<Answer>, id: string) {
  const { status, body } = await answer;
  expect(status).toBe(404);
  expect(JSON.parse(body).error).toEqual({ code: "NotFound", message: expect.stringContaining(`microVM ${id} not found`) });
  return body.replace(id, "{id}");
}

describe("endpoint router", () => {
  it("serves {id}.vm.localhost with the endpoint token; without a credential of the VM it is a 404 like a VM that does not exist", async () => {
    const vm = await createApp();
    const host = new URL(vm.endpoint.url).host;
    expect(vm.endpoint.url).toMatch(new RegExp(`^http://${vm.microVmId}\\.vm\\.localhost:\\d+/$`));
    const ok = await get("/hello?x=1", { host, authorization: `Bearer ${vm.endpoint.token}` });
    expect(ok).toMatchObject({ status: 200, body: "count=1 path=/hello?x=1\n" });
    const missing = await expectHidden(get("/", { host: host.replace(vm.microVmId, "vm-0000000000000000") }), "vm-0000000000000000");
    const refused: Record<string, string>[] = [{}, { authorization: `Bearer ${other}` }, { authorization: `Bearer ${readOnly}` }, { authorization: "Bearer et_wrong" }, { cookie: `cocoon_token_${vm.microVmId}=et_wrong` }];
    for (const headers of refused) {
      expect(await expectHidden(get("/", { host, ...headers }), vm.microVmId)).toBe(missing);
    }
    expect((await get("/", { host, authorization: `Bearer ${key}` })).body).toBe("count=2 path=/\n");
  });

  it("serves /v1/microvms/{id}/http/… with ?cocoon_token= once, then its cookie, scoped to that path; sandboxed, without the app's cookies", async () => {
    const vm = await createApp();
    const base = `/v1/microvms/${vm.microVmId}/http`;
    const first = await get(`${base}/a/b?cocoon_token=${vm.endpoint.token}&q=2`, {});
    expect(first.body).toBe("count=1 path=/a/b?q=2\n");
    // Only Cocoon's cookie: the app's act on the whole API origin and are dropped here.
    expect(first.headers["set-cookie"]).toEqual([`cocoon_token_${vm.microVmId}=${vm.endpoint.token}; Path=${base}/; HttpOnly; SameSite=Strict`]);
    expect(first.headers["content-security-policy"]).toBe("sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads");
    const cookie = `cocoon_token_${vm.microVmId}=${vm.endpoint.token}`;
    expect((await get(`${base}/again`, { cookie })).body).toBe("count=2 path=/again\n");
    // A browser request authenticated by the cookie alone must come from the endpoint's own origin.
    const own = `http://${new URL(api.url).host}`;
    expect((await get(`${base}/same-origin`, { cookie, origin: own })).status).toBe(200);
    for (const origin of ["null", "http://evil.example", `http://${vm.microVmId}.vm.localhost:1`]) {
      const refused = await get(`${base}/x`, { cookie, origin });
      expect(refused.status).toBe(403);
      expect(JSON.parse(refused.body).error.code).toBe("Forbidden");
    }
    expect((await get(`${base}/x`, { cookie, "sec-fetch-site": "cross-site" }, "POST")).status).toBe(403);
    // The token itself (not a cookie) is not a browser's ambient credential: no Origin check.
    expect((await get(`${base}/with-token`, { authorization: `Bearer ${vm.endpoint.token}`, origin: "null" })).status).toBe(200);
  });

  it("on {id}.vm.localhost sets a host-only cookie, and keeps the app's cookies host-only too", async () => {
    const vm = await createApp();
    const host = new URL(vm.endpoint.url).host;
    const first = await get(`/?cocoon_token=${vm.endpoint.token}`, { host });
    expect(first.status).toBe(200);
    // The app's Domain= is dropped (it would reach every VM's host) and its cocoon_token_* cookie is refused.
    expect(first.headers["set-cookie"]).toEqual(["app=1", `cocoon_token_${vm.microVmId}=${vm.endpoint.token}; Path=/; HttpOnly; SameSite=Strict`]);
    expect(first.headers["content-security-policy"]).toBeUndefined();
  });

  it("sets the cookie only from a token that matched: an unmatched or malformed parameter sets none", async () => {
    const vm = await createApp();
    const host = new URL(vm.endpoint.url).host;
    await expectHidden(get("/?cocoon_token=%0a", { host }), vm.microVmId);
    await expectHidden(get(`/v1/microvms/${vm.microVmId}/http/?cocoon_token=%0d%0aSet-Cookie:%20x=1`, {}), vm.microVmId);
    // With another credential the parameter is ignored: served, and no cookie from it.
    const served = await get("/?cocoon_token=%0a", { host, authorization: `Bearer ${key}` });
    expect(served.status).toBe(200);
    expect(served.headers["set-cookie"]).toEqual(["app=1"]);
  });

  it("needs no credentials for a public endpoint's app port, but does for its other ports", async () => {
    const vm = await createApp({ endpoint: { public: true } });
    expect((await get(`/v1/microvms/${vm.microVmId}/http/`, {})).status).toBe(200);
    const host = new URL(vm.endpoint.url).host;
    await expectHidden(get("/", { host: `9090-${host}` }), vm.microVmId);
  });

  it("reaches any guest port at {port}-{id}.vm.localhost through the agent, and access tokens open only their ports of their VM", async () => {
    const vm = await createApp();
    const peer = await createApp();
    await startApp(api, key, vm.microVmId, counterApp(9090), 9090);
    const host = new URL(vm.endpoint.url).host;
    const auth = { authorization: `Bearer ${vm.endpoint.token}` };
    expect((await get("/nine", { host: `9090-${host}`, ...auth })).body).toBe("count=1 path=/nine\n");
    expect((await get("/eight", { host: `8080-${host}`, ...auth })).body).toBe("count=1 path=/eight\n");
    expect((await get("/app", { host, ...auth })).body).toBe("count=2 path=/app\n");
    const closed = await get("/", { host: `9191-${host}`, ...auth });
    expect(closed.status).toBe(502);
    expect(JSON.parse(closed.body).error).toEqual({ code: "BadGateway", message: expect.stringContaining("nothing answers on port 9191") });
    expect((await get("/", { host: `10789-${host}`, ...auth })).status).toBe(404); // the agent's own port
    expect((await get("/", { host: `70000-${host}`, ...auth })).status).toBe(404);

    const issue = (body: unknown, k = key, id = vm.microVmId) => api.call("POST", `/v1/microvms/${id}/auth-tokens`, { key: k, body });
    const created = await issue({ ports: [{ port: 9090 }], expiresInMinutes: 5 });
    expect(created.status, created.text).toBe(201);
    expect(created.body).toEqual({ token: expect.any(String), header: "X-aws-proxy-auth", expiresAt: expect.any(String) });
    const token = created.body.token as string;
    expect((await get("/tok", { host: `9090-${host}`, "x-aws-proxy-auth": token })).body).toBe("count=2 path=/tok\n");
    expect((await get("/tok", { host: `9090-${host}`, authorization: `Bearer ${token}` })).body).toBe("count=3 path=/tok\n");
    await expectHidden(get("/", { host: `8080-${host}`, "x-aws-proxy-auth": token }), vm.microVmId);
    await expectHidden(get("/", { host, "x-aws-proxy-auth": token }), vm.microVmId); // the app port is 8080
    await expectHidden(get("/", { host: `9090-${peer.microVmId}.vm.localhost`, "x-aws-proxy-auth": token }), peer.microVmId);
    const range = (await issue({ ports: [{ range: { startPort: 8000, endPort: 8100 } }], expiresInMinutes: 5 })).body.token as string;
    expect((await get("/r", { host, "x-aws-proxy-auth": range })).status).toBe(200);
    await expectHidden(get("/r", { host: `9090-${host}`, "x-aws-proxy-auth": range }), vm.microVmId);
    const all = (await issue({ ports: [{ allPorts: true }], expiresInMinutes: 5 })).body.token as string;
    expect((await get("/all", { host: `9090-${host}`, "x-aws-proxy-auth": all })).status).toBe(200);
    // (Expiry is in the signed token: test/unit/edge.test.ts "AccessTokens"; lifetimes are whole minutes here.)
    expect((await issue({ ports: [{ allPorts: true }], expiresInMinutes: 5 }, other)).status).toBe(404);
  });

  it("resumes a suspended VM on a request and then answers it, counter intact", async () => {
    const vm = await createApp();
    const auth = { authorization: `Bearer ${vm.endpoint.token}` };
    expect((await get(`/v1/microvms/${vm.microVmId}/http/`, auth)).body).toBe("count=1 path=/\n");
    await api.call("POST", `/v1/microvms/${vm.microVmId}/suspend`, { key });
    expect((await get(`/v1/microvms/${vm.microVmId}/http/`, auth)).body).toBe("count=2 path=/\n");
    const events = (await api.call("GET", `/v1/microvms/${vm.microVmId}/events`, { key })).body.events.map((e: { message: string }) => e.message);
    expect(events).toContain("resumed (serve a request to)");
  });

  it("relays WebSockets to the app", async () => {
    const vm = await createApp({}, WS_ECHO_APP);
    const url = `${api.url.replace("http", "ws")}/v1/microvms/${vm.microVmId}/http/socket?cocoon_token=${vm.endpoint.token}`;
    const ws = new WebSocket(url);
    const replies: string[] = [];
    await new Promise<void>((resolve, reject) => {
      ws.on("open", () => ws.send("one"));
      ws.on("message", (data: Buffer) => {
        replies.push(data.toString());
        if (replies.length === 1) ws.send("two");
        else resolve();
      });
      ws.on("error", reject);
    });
    ws.close();
    expect(replies).toEqual(["echo:one", "echo:two"]);
  });

  it("counts WebSocket traffic as activity: a relayed session outlives the idle window", async () => {
    const vm = await createApp({ idlePolicy: { suspendAfterSeconds: 2 } }, WS_ECHO_APP);
    const ws = new WebSocket(`${api.url.replace("http", "ws")}/v1/microvms/${vm.microVmId}/http/?cocoon_token=${vm.endpoint.token}`);
    await new Promise((resolve, reject) => ws.on("open", resolve).on("error", reject));
    let echoes = 0;
    ws.on("message", () => echoes++);
    const eventTypes = async () => (await api.call("GET", `/v1/microvms/${vm.microVmId}/events`, { key })).body.events.map((e: { type: string }) => e.type) as string[];
    const before = (await eventTypes()).length; // setup may have idled past the window already
    // Three idle windows of traffic, a message every half second.
    for (let i = 0; i < 12; i++) {
      ws.send(`ping ${i}`);
      await new Promise((r) => setTimeout(r, 500));
    }
    expect(echoes).toBeGreaterThanOrEqual(11);
    expect((await api.call("GET", `/v1/microvms/${vm.microVmId}`, { key })).body.state).toBe("RUNNING");
    ws.close();
    expect((await eventTypes()).slice(before)).not.toContain("suspended");
  });

  it("says so when a VM serves no app", async () => {
    const res = await api.call("POST", "/v1/microvms", { key, body: { image: "base" } });
    expect(res.status, res.text).toBe(201);
    onTestFinished(async () => void (await api.call("DELETE", `/v1/microvms/${res.body.microVmId}`, { key })));
    const r = await get(`/v1/microvms/${res.body.microVmId}/http/`, { authorization: `Bearer ${res.body.endpoint.token}` });
    expect(r.status).toBe(404);
    expect(r.body).toContain("serves no app");
  });
});
