import { randomBytes, timingSafeEqual } from "node:crypto";
import { lookup } from "node:dns/promises";
import { createServer, type IncomingMessage, type Server } from "node:http";
import { connect, isIP, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import { classifyAddress, cidrListFromEnv, inRanges, type Cidr } from "../../vmm/network/addresses.ts";

/**
 * Where the server may fetch registry content from on a tenant's behalf.
 * `FROM 10.0.0.5:5000/x` must not turn the server into a probe of the
 * operator's private network (SSRF): every connection skopeo makes goes
 * through a CONNECT proxy on loopback that resolves the name itself and
 * connects only to a public address (`classifyAddress`: not the host's, a
 * floor or a private range, as for code URIs and VM egress) unless the
 * operator allows it (COCOON_REGISTRY_PRIVATE_ALLOW, CIDRs: an internal
 * registry). The checked address is the one connected to, so DNS rebinding
 * gains nothing. Go's proxy support skips `localhost` and loopback literals,
 * so those are checked before skopeo runs (`checkHost`).
 */
export class RegistryEgress {
  private server: Promise<{ server: Server; url: string }> | undefined;
  private readonly token = randomBytes(18).toString("base64url");
  private readonly sockets = new Set<Duplex>();

  /** `resolve`: a name's addresses (default: the system resolver, as skopeo itself would use). */
  constructor(
    private readonly privateAllow: readonly Cidr[] = [],
    private readonly resolve: (host: string) => Promise<string[]> = async (host) => (await lookup(host, { all: true, verbatim: true })).map((a) => a.address),
  ) {}

  /** COCOON_REGISTRY_PRIVATE_ALLOW ("10.1.0.0/16, 127.0.0.1"); throws naming the variable and a bad entry. */
  static allowFromEnv(env: NodeJS.ProcessEnv = process.env): Cidr[] {
    return cidrListFromEnv("COCOON_REGISTRY_PRIVATE_ALLOW", env);
  }

  /** Why an address may not be reached, or undefined if it may. */
  refusal(address: string): string | undefined {
    if (!classifyAddress(address) || inRanges(address, this.privateAllow)) return undefined;
    return `${address} is a host, private or link-local address (allow it with COCOON_REGISTRY_PRIVATE_ALLOW)`;
  }

  /** Refuses a registry named by an address that may not be reached (and localhost, which Go's proxy support bypasses), before skopeo runs. */
  checkHost(registry: string): string | undefined {
    const host = registry.replace(/:\d+$/, "").replace(/^\[|\]$/g, "");
    if (host === "localhost") return this.refusal("127.0.0.1");
    return isIP(host) ? this.refusal(host) : undefined;
  }

  /** `http://cocoon:<token>@127.0.0.1:<port>`, for HTTPS_PROXY (started on first use). */
  async proxyUrl(): Promise<string> {
    this.server ??= new Promise((resolve, reject) => {
      const server = createServer((_req, res) => res.writeHead(405, "only CONNECT").end());
      server.on("connect", (req: IncomingMessage, client: Duplex, head: Buffer) => void this.onConnect(req, client, head));
      server.on("error", reject);
      server.listen(0, "127.0.0.1", () => {
        const addr = server.address() as { port: number };
        resolve({ server, url: `http://cocoon:${this.token}@127.0.0.1:${addr.port}` });
      });
    });
    return (await this.server).url;
  }

  async close(): Promise<void> {
    const started = this.server;
    this.server = undefined;
    for (const s of this.sockets) s.destroy();
    if (started) await new Promise<void>((resolve) => void started.then(({ server }) => server.close(() => resolve())));
  }

  private async onConnect(req: IncomingMessage, client: Duplex, head: Buffer): Promise<void> {
    this.sockets.add(client);
    client.on("close", () => this.sockets.delete(client));
    client.on("error", () => undefined);
    const refuse = (status: number, reason: string): void => void client.end(`HTTP/1.1 ${status} ${reason.replace(/[^\x20-\x7e]/g, "?")}\r\n\r\n`);
    const auth = /^Basic (.+)$/i.exec(req.headers["proxy-authorization"] ?? "")?.[1];
    const expected = Buffer.from(`cocoon:${this.token}`);
    const given = Buffer.from(auth ? Buffer.from(auth, "base64").toString() : "");
    if (given.length !== expected.length || !timingSafeEqual(given, expected)) return refuse(407, "proxy authentication required");
    const m = /^(\[[0-9a-f:.]+\]|[^:[\]]+):(\d{1,5})$/i.exec(req.url ?? "");
    const port = Number(m?.[2]);
    if (!m || port < 1 || port > 65535) return refuse(400, "bad CONNECT target");
    const host = m[1]!.replace(/^\[|\]$/g, "");
    let addresses: string[];
    try {
      addresses = isIP(host) ? [host] : await this.resolve(host);
    } catch (err) {
      return refuse(502, `cannot resolve ${host}: ${(err as NodeJS.ErrnoException).code ?? "error"}`);
    }
    const reasons = addresses.map((a) => this.refusal(a));
    const address = addresses.find((_a, i) => !reasons[i]);
    if (!address) return refuse(403, `registry ${host} refused: ${reasons[0] ?? "no address"}`);
    const upstream: Socket = connect({ host: address, port, timeout: 30_000 });
    this.sockets.add(upstream);
    upstream.on("close", () => this.sockets.delete(upstream));
    upstream.once("timeout", () => upstream.destroy(new Error("connect timeout")));
    let connected = false;
    upstream.once("connect", () => {
      connected = true;
      upstream.setTimeout(0);
      client.write("HTTP/1.1 200 Connection Established\r\n\r\n");
      if (head.length) upstream.write(head);
      upstream.pipe(client);
      client.pipe(upstream);
    });
    upstream.on("error", (err) => (connected ? client.destroy() : refuse(502, `cannot connect to ${host}:${port}: ${err.message}`)));
    client.on("close", () => upstream.destroy());
  }
}
