import type { IncomingMessage, ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { CocoonClient } from "@cocoon/sdk";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { createMcpServer } from "./tools.ts";

/**
 * Answers one request of MCP's streamable HTTP transport, statelessly: every
 * POST gets its own MCP server and transport (no session, JSON answers), so
 * any host of a cluster can answer any request. The tools reach the API at
 * `apiBaseUrl` with the caller's own Bearer key, as any client would; the
 * route has already checked that key.
 */
export async function handleMcpHttpRequest(req: IncomingMessage, res: ServerResponse, parsedBody: unknown, apiBaseUrl: string): Promise<void> {
  if (req.method !== "POST") {
    // GET would open a stream for server-initiated messages, which a stateless
    // server never sends (the transport would hold it open for nothing); there is no session to DELETE.
    res.writeHead(405, { allow: "POST", "content-type": "application/json" });
    res.end(JSON.stringify({ jsonrpc: "2.0", error: { code: -32000, message: `${req.method} is not supported: this MCP server is stateless; POST each request` }, id: null }));
    return;
  }
  const apiKey = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? "")?.[1];
  const server = createMcpServer(new CocoonClient({ baseUrl: apiBaseUrl, apiKey }));
  const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
  res.on("close", () => {
    void transport.close();
    void server.close();
  });
  try {
    await server.connect(transport);
    await transport.handleRequest(req, res, parsedBody);
  } catch (err) {
    // The transport answers protocol errors itself; this is a fault below it.
    if (!res.headersSent) {
      res.writeHead(500, { "content-type": "application/json" }).end(JSON.stringify({ error: { code: "Internal", message: "the MCP request failed" } }));
    } else res.destroy(err as Error);
  }
}

/** The base URL at which a server reaches itself: its own address, or loopback when it listens on every address. */
export function loopbackUrl(address: AddressInfo | string | null): string {
  if (!address || typeof address === "string") throw new Error("the server is not listening on a TCP port");
  const host = address.address === "0.0.0.0" ? "127.0.0.1" : address.address === "::" ? "::1" : address.address;
  return `http://${host.includes(":") ? `[${host}]` : host}:${address.port}`;
}
