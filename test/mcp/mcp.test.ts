import { CocoonClient } from "@cocoon/sdk";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { afterAll, describe, expect, it } from "vitest";
import { CLI_BIN, useServerProcess } from "../support/server-process.ts";

// The MCP server (packages/mcp) driven by the MCP SDK's own client, over stdio
// (`cocoon mcp` spawned as an MCP client does) and over streamable HTTP at
// /mcp, against a real server; one VM serves every tool call.
const server = await useServerProcess();
const clients: Client[] = [];
afterAll(async () => {
  for (const c of clients) await c.close();
});

const TOOLS = [
  "create_sandbox",
  "list_files",
  "list_sandboxes",
  "read_file",
  "resume_sandbox",
  "run_code",
  "run_command",
  "suspend_sandbox",
  "terminate_sandbox",
  "write_file",
];

async function connect(transport: StdioClientTransport | StreamableHTTPClientTransport): Promise<Client> {
  const client = new Client({ name: "cocoon-test", version: "1.0.0" });
  await client.connect(transport);
  clients.push(client);
  return client;
}

/** Calls a tool and returns its text and whether it is a tool error. */
async function call(client: Client, name: string, args: Record<string, unknown>): Promise<{ text: string; isError: boolean }> {
  const result = await client.callTool({ name, arguments: args });
  const content = result.content as { type: string; text?: string }[];
  expect(content.every((c) => c.type === "text")).toBe(true);
  return { text: content.map((c) => c.text).join(""), isError: result.isError === true };
}

function env(vars: NodeJS.ProcessEnv): Record<string, string> {
  return Object.fromEntries(Object.entries(vars).filter((e): e is [string, string] => e[1] !== undefined));
}

describe("the MCP server against a real server", () => {
  let vmId = "";

  it("serves the sandbox tools over stdio (cocoon mcp)", async () => {
    let stderr = "";
    // The key comes from COCOON_DATA_DIR/admin.key, as for every CLI command.
    const transport = new StdioClientTransport({ command: process.execPath, args: [CLI_BIN, "mcp"], env: env(server.cliEnv), stderr: "pipe" });
    transport.stderr?.on("data", (d: Buffer) => (stderr += d.toString()));
    const mcp = await connect(transport);
    expect(mcp.getServerVersion()?.name).toBe("cocoon");
    expect(mcp.getInstructions()).toContain("create_sandbox");
    expect((await mcp.listTools()).tools.map((t) => t.name).sort()).toEqual(TOOLS);

    const created = await call(mcp, "create_sandbox", { memoryMiB: 512, egress: "none" });
    expect(created.isError).toBe(false);
    vmId = /created sandbox (vm-[0-9a-f]+): RUNNING/.exec(created.text)?.[1] ?? "";
    expect(vmId).not.toBe("");

    const ran = await call(mcp, "run_command", { sandboxId: vmId, command: "echo hi; echo oops >&2; exit 3" });
    expect(ran).toEqual({ text: expect.stringMatching(/^exit code 3, [\d.]+ s\nstdout:\nhi\n\nstderr:\noops\n$/), isError: false });
    expect((await call(mcp, "run_command", { sandboxId: vmId, command: "pwd; echo $A", cwd: "/tmp", env: { A: "b" } })).text).toContain("stdout:\n/tmp\nb\n");
    expect((await call(mcp, "run_code", { sandboxId: vmId, language: "shell", code: "echo $((6 * 7))" })).text).toContain("stdout:\n42\n");
    const python = await call(mcp, "run_code", { sandboxId: vmId, language: "python", code: "print(6 * 7)" });
    // The base image may or may not carry python3; either it runs, or the tool says the image lacks it.
    if (python.isError) expect(python.text).toMatch(/^CommandNotFound: .*python3.*image base has no python3/);
    else expect(python.text).toContain("stdout:\n42\n");

    // 100 000 bytes of output: cut in the middle, with a note saying how much and how to get the rest.
    const long = await call(mcp, "run_command", { sandboxId: vmId, command: "head -c 100000 /dev/zero | tr '\\0' a; echo; echo the-end" });
    expect(long.isError).toBe(false);
    expect(Buffer.byteLength(long.text)).toBeLessThan(17 * 1024);
    expect(long.text).toMatch(/\[… \d+ of 100009 bytes of stdout cut here; to see all of it, redirect the output to a file/);
    expect(long.text).toContain("the-end");

    expect((await call(mcp, "write_file", { sandboxId: vmId, path: "/tmp/mcp/hello.txt", content: "héllo\n" })).text).toBe("wrote 7 bytes to /tmp/mcp/hello.txt");
    expect((await call(mcp, "write_file", { sandboxId: vmId, path: "/tmp/mcp/bin.dat", content: Buffer.from([0, 1, 2]).toString("base64"), encoding: "base64" })).text).toBe(
      "wrote 3 bytes to /tmp/mcp/bin.dat",
    );
    expect((await call(mcp, "read_file", { sandboxId: vmId, path: "/tmp/mcp/hello.txt" })).text).toBe("héllo\n");
    expect((await call(mcp, "read_file", { sandboxId: vmId, path: "/tmp/mcp/bin.dat" })).text).toBe("[binary content, base64]\nAAEC");
    await call(mcp, "run_command", { sandboxId: vmId, command: "head -c 20000 /dev/zero | tr '\\0' b > /tmp/mcp/big.txt" });
    const first = await call(mcp, "read_file", { sandboxId: vmId, path: "/tmp/mcp/big.txt" });
    expect(first.text).toBe(`${"b".repeat(16384)}\n[bytes 0-16384 shown; more follows: call read_file with offset 16384]`);
    const rest = await call(mcp, "read_file", { sandboxId: vmId, path: "/tmp/mcp/big.txt", offset: 16384 });
    expect(rest.text).toBe(`${"b".repeat(20000 - 16384)}\n[bytes 16384-20000 shown: the end of the file]`);
    await call(mcp, "run_command", { sandboxId: vmId, command: "head -c 20000 /dev/zero > /tmp/mcp/zeros.bin" });
    const zeros = await call(mcp, "read_file", { sandboxId: vmId, path: "/tmp/mcp/zeros.bin" });
    expect(zeros.text).toBe(`[binary content, base64]\n${Buffer.alloc(12288).toString("base64")}\n[bytes 0-12288 shown; more follows: call read_file with offset 12288]`);
    const listing = (await call(mcp, "list_files", { sandboxId: vmId, path: "/tmp/mcp" })).text.split("\n");
    expect(listing.map((l) => l.split(/\s+/).at(-1)).sort()).toEqual(["big.txt", "bin.dat", "hello.txt", "zeros.bin"]);
    expect(listing).toContainEqual(expect.stringMatching(/^file\s+20000 {2}big\.txt$/));

    expect((await call(mcp, "list_sandboxes", {})).text).toMatch(new RegExp(`^${vmId} {2}RUNNING, image base, 1 vCPU, 512 MiB, egress none`, "m"));
    expect((await call(mcp, "suspend_sandbox", { sandboxId: vmId })).text).toBe(`sandbox ${vmId} is SUSPENDED`);
    expect((await call(mcp, "list_sandboxes", { state: "SUSPENDED" })).text).toContain(vmId);
    expect((await call(mcp, "resume_sandbox", { sandboxId: vmId })).text).toBe(`sandbox ${vmId} is RUNNING`);
    expect((await call(mcp, "read_file", { sandboxId: vmId, path: "/tmp/mcp/hello.txt" })).text).toBe("héllo\n");

    // API errors are tool errors carrying the API's code and message.
    expect(await call(mcp, "run_command", { sandboxId: "vm-does-not-exist", command: "true" })).toEqual({ text: "NotFound: microVM vm-does-not-exist not found", isError: true });
    const invalid = await call(mcp, "create_sandbox", { memoryMiB: 64 });
    expect(invalid.isError).toBe(true);
    expect(invalid.text).toMatch(/^ValidationError: .*memoryMiB/);
    expect((await call(mcp, "resume_sandbox", { sandboxId: vmId })).text).toMatch(/^InvalidState: /);
    expect(stderr).toBe("");
  });

  it("serves the same tools over streamable HTTP at /mcp, with the caller's Bearer key", async () => {
    expect(vmId).not.toBe("");
    const url = new URL(`${server.url}/mcp`);
    const anonymous = await fetch(url, { method: "POST", headers: { "content-type": "application/json", accept: "application/json, text/event-stream" }, body: "{}" });
    expect(anonymous.status).toBe(401);
    expect(((await anonymous.json()) as { error: { code: string } }).error.code).toBe("Unauthorized");

    // Hostile or stray requests with a valid key: 4xx answers, never a fault.
    const auth = { authorization: `Bearer ${server.adminKey}`, accept: "application/json, text/event-stream" };
    const post = (body: string) => fetch(url, { method: "POST", headers: { ...auth, "content-type": "application/json" }, body });
    expect((await post("{not json")).status).toBe(400);
    expect((await post(JSON.stringify({ jsonrpc: "2.0", id: 1, method: "tools/call", params: { name: "run_command", arguments: "x" } }))).status).toBeLessThan(500);
    expect((await post(JSON.stringify({ hello: "world" }))).status).toBe(400);
    expect((await post(JSON.stringify({ jsonrpc: "2.0", id: 1, method: "x".repeat(2 * 1024 * 1024) }))).status).toBe(413);
    expect((await fetch(url, { headers: auth })).status).toBe(405); // no server-initiated stream: stateless

    const mcp = await connect(new StreamableHTTPClientTransport(url, { requestInit: { headers: { authorization: `Bearer ${server.adminKey}` } } }));
    expect((await mcp.listTools()).tools.map((t) => t.name).sort()).toEqual(TOOLS);
    expect((await call(mcp, "read_file", { sandboxId: vmId, path: "/tmp/mcp/hello.txt" })).text).toBe("héllo\n");
    expect((await call(mcp, "run_command", { sandboxId: vmId, command: "cat /tmp/mcp/hello.txt | wc -c" })).text).toContain("stdout:\n7\n");

    // Another tenant's key reaches the tools, but the tools act as that tenant: the VM does not exist for it.
    const admin = new CocoonClient({ baseUrl: server.url, apiKey: server.adminKey });
    await admin.tenants.create({ name: "mcp-other" });
    const other = await admin.keys.create({ tenant: "mcp-other", permissions: ["microvm:*"] });
    const otherMcp = await connect(new StreamableHTTPClientTransport(url, { requestInit: { headers: { authorization: `Bearer ${other.apiKey}` } } }));
    expect(await call(otherMcp, "run_command", { sandboxId: vmId, command: "true" })).toEqual({ text: `NotFound: microVM ${vmId} not found`, isError: true });
    expect((await call(otherMcp, "list_sandboxes", {})).text).toBe("no sandboxes");

    expect((await call(mcp, "terminate_sandbox", { sandboxId: vmId })).text).toBe(`sandbox ${vmId} is TERMINATED`);
    expect((await admin.microvms.get(vmId)).state).toBe("TERMINATED");
  });
});
