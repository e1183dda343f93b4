import type { CocoonClient } from "@cocoon/sdk";
import { StdioServerTransport } from "@modelcontextprotocol/sdk/server/stdio.js";
import { createMcpServer } from "./tools.ts";

/**
 * Serves MCP on this process's stdin and stdout (`cocoon mcp`) until stdin
 * ends, with tools that call the API through `client`. Nothing else may be
 * written to stdout meanwhile: it carries the protocol.
 */
export async function serveStdio(client: CocoonClient): Promise<void> {
  const server = createMcpServer(client);
  const closed = new Promise<void>((resolve) => (server.server.onclose = resolve));
  process.stdin.once("end", () => void server.close());
  await server.connect(new StdioServerTransport());
  await closed;
}
