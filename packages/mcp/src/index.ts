/**
 * @cocoon/mcp — a Model Context Protocol server for Cocoon: sandbox tools
 * (tools.ts) built on the TypeScript SDK, served over stdio (`cocoon mcp`)
 * and over streamable HTTP (`/mcp` on the API's port).
 */
export { createMcpServer, MCP_SERVER_NAME, MCP_SERVER_VERSION } from "./tools.ts";
export { handleMcpHttpRequest, loopbackUrl } from "./http.ts";
export { serveStdio } from "./stdio.ts";
export { OUTPUT_BUDGET_BYTES, READ_CHUNK_BYTES } from "./output.ts";
