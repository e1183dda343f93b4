import { request } from "node:http";
import WebSocket from "ws";
import { describe, expect, it } from "vitest";
import { useApi } from "../support/api-fixture.ts";

const api = await useApi();
const key = await api.tenantKey("erin");
const other = await api.tenantKey("frank");

/**
 * A counting HTTP server for the base image, which has perl-base but no
 * python: each answer says how many requests it has served and the path.
 */
const COUNTER_APP = `nohup perl -MIO::Socket::INET -e '
  my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 16, ReuseAddr => 1) or die;
  my $n = 0;
  while (my $c = $s->accept) {
    my $first = <$c>; next unless defined $first; # a readiness probe: no request
    while (my $l = <$c>) { last if $l eq "\\r\\n" }
    $n++; my $path = (split / /, $first)[1];
    my $b = "count=$n path=$path\\n";
    print $c "HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nSet-Cookie: app=1\\r\\nContent-Length: " . length($b) . "\\r\\nConnection: close\\r\\n\\r\\n$b";
    close $c;
  }' > /dev/null 2>&1 &`;

/** A WebSocket echo server on port 8080 (perl-base has Digest::SHA and MIME::Base64 for the handshake). */
const WS_ECHO_APP = `nohup perl -MIO::Socket::INET -MDigest::SHA=sha1 -MMIME::Base64 -e '
  my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 16, ReuseAddr => 1) or die;
  while (my $c = $s->accept) {
    $c->autoflush(1);
    my $key; while (my $l = <$c>) { $key = $1 if $l =~ /^Sec-WebSocket-Key:\\s*(\\S+)/i; last if $l eq "\\r\\n" }
    next unless $key;
    my $accept = encode_base64(sha1($key . "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"), "");
    print $c "HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\nSec-WebSocket-Accept: $accept\\r\\n\\r\\n";
    while (read($c, my $h, 2) == 2) {
      my ($b0, $b1) = unpack("CC", $h); my $len = $b1 & 127;
      read($c, my $mask, 4); my $p = ""; read($c, $p, $len) if $len;
      $p ^= substr($mask x (1 + $len / 4), 0, $len);
      last if ($b0 & 15) == 8;
      my $o = "echo:$p"; print $c pack("CC", 0x81, length $o) . $o;
    }
    close $c;
  }' > /dev/null 2>&1 &`;

async function createApp(body: Record<string, unknown> = {}, app = COUNTER_APP) {
  const res = await api.call("POST", "/v1/microvms", { key, body: { image: "base", appPort: 8080, idlePolicy: { suspendAfterSeconds: 0 }, ...body } });
  expect(res.status, res.text).toBe(201);
  const vm = res.body as { microVmId: string; endpoint: { url: string; token: string } };
  await api.call("POST", `/v1/microvms/${vm.microVmId}/exec`, { key, body: { command: app } });
  // perl takes seconds to start under TCG: wait (up to ~60 s) until the port accepts.
  const ready = await api.call("POST", `/v1/microvms/${vm.microVmId}/exec`, {
    key,
    // bash, not sh (dash): /dev/tcp is a bash feature.
    body: { command: ["bash", "-c", "for i in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && exit 0; sleep 0.2; done; exit 1"], timeoutSeconds: 120 },
  });
  expect(ready.body.exitCode, "app port never opened").toBe(0);
  return vm;
}

/** GET through the server with an explicit Host header (curl-style: *.vm.localhost maps to loopback). */
function get(path: string, headers: Record<string, string>): Promise<{ status: number; body: string; headers: Record<string, unknown> }> {
  const { port } = new URL(api.url);
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path, headers }, (res) => {
      let body = "";
      res.on("data", (d: Buffer) => (body += d.toString()));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
    });
    req.on("error", reject);
    req.end();
  });
}

describe("endpoint router", () => {
  it("serves {id}.vm.localhost with the endpoint token, and answers 401 without it", async () => {
    const vm = await createApp();
    const host = new URL(vm.endpoint.url).host;
    expect(vm.endpoint.url).toMatch(new RegExp(`^http://${vm.microVmId}\\.vm\\.localhost:\\d+/$`));
    const ok = await get("/hello?x=1", { host, authorization: `Bearer ${vm.endpoint.token}` });
    expect(ok).toMatchObject({ status: 200, body: "count=1 path=/hello?x=1\n" });
    expect((await get("/", { host })).status).toBe(401);
    expect((await get("/", { host, authorization: `Bearer ${other}` })).status).toBe(401);
    expect((await get("/", { host, authorization: `Bearer ${key}` })).body).toBe("count=2 path=/\n");
  });

  it("serves /v1/microvms/{id}/http/… with ?cocoon_token= once, then its cookie", async () => {
    const vm = await createApp();
    const first = await get(`/v1/microvms/${vm.microVmId}/http/a/b?cocoon_token=${vm.endpoint.token}&q=2`, {});
    expect(first.body).toBe("count=1 path=/a/b?q=2\n");
    const cookies = first.headers["set-cookie"] as string[];
    expect(cookies).toEqual(expect.arrayContaining(["app=1", expect.stringContaining(`cocoon_token_${vm.microVmId}=`)]));
    const cookie = cookies.find((c) => c.startsWith("cocoon_token_"))!.split(";")[0]!;
    expect((await get(`/v1/microvms/${vm.microVmId}/http/again`, { cookie })).body).toBe("count=2 path=/again\n");
  });

  it("needs no credentials for a public endpoint", async () => {
    const vm = await createApp({ endpoint: { public: true } });
    expect((await get(`/v1/microvms/${vm.microVmId}/http/`, {})).status).toBe(200);
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

  it("says so when a VM serves no app", async () => {
    const res = await api.call("POST", "/v1/microvms", { key, body: { image: "base" } });
    const r = await get(`/v1/microvms/${res.body.microVmId}/http/`, { authorization: `Bearer ${res.body.endpoint.token}` });
    expect(r.status).toBe(404);
    expect(r.body).toContain("serves no app");
  });
});
