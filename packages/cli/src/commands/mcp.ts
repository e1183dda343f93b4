import type { Command } from "commander";
import { globals } from "../common.ts";
import { makeClient } from "../config.ts";

/** `cocoon mcp`: the MCP server (packages/mcp) on stdin/stdout, its tools calling the API at --url with the resolved key. */
export function registerMcpCommand(program: Command): void {
  program
    .command("mcp")
    .description("serve the Model Context Protocol on stdin/stdout for an AI agent (Claude Desktop, Claude Code, …): sandbox tools over the API; see docs/mcp.md")
    .action(async (_o: unknown, cmd: Command) => {
      const { client, keySource } = await makeClient(globals(cmd));
      // stdout carries the protocol; notes go to stderr, which MCP clients log.
      if (keySource === "none") process.stderr.write("cocoon mcp: no API key (pass --api-key or set COCOON_API_KEY); every tool will answer Unauthorized\n");
      // Loaded here: the MCP SDK is not needed by, nor loaded for, the other commands.
      const { serveStdio } = await import("@cocoon/mcp");
      await serveStdio(client);
    });
}
