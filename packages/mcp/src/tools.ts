import { CocoonError, CommandNotFoundError, MICROVM_STATES, type CocoonClient, type Egress, type ExecResult, type MicroVmInfo, type MicroVmState } from "@cocoon/sdk";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import type { CallToolResult } from "@modelcontextprotocol/sdk/types.js";
import { z } from "zod";
import { MAX_LIST_ENTRIES, READ_CHUNK_BYTES, clip, outputBudgets, wholeCharsLength } from "./output.ts";

export const MCP_SERVER_NAME = "cocoon";
export const MCP_SERVER_VERSION = "0.1.0";

const INSTRUCTIONS =
  "Cocoon runs code in isolated microVM sandboxes (Debian, root inside, no network unless asked). " +
  "Create one with create_sandbox, then pass its sandboxId to run_command, run_code, read_file, write_file and list_files; " +
  "files and processes persist between calls. An idle sandbox suspends itself and resumes on the next call. " +
  "terminate_sandbox when done. Long output is cut in the middle with a note saying how to read the rest.";

/** The languages run_code knows, each as the argv that runs a program given as one argument. */
const INTERPRETERS = {
  python: ["python3", "-c"],
  node: ["node", "-e"],
  shell: ["sh", "-c"],
} as const;

const sandboxId = z.string().min(1).describe("the sandbox's id (vm-…), from create_sandbox or list_sandboxes");
const timeoutSeconds = z.number().positive().optional().describe("kill the command after this many seconds (default 60)");

/**
 * An MCP server whose tools drive sandboxes (microVMs) through `client`, the
 * TypeScript SDK: over stdio a client of COCOON_URL, over HTTP a client of the
 * server's own loopback address with the caller's key, so every tool call goes
 * through the public API and its authorization.
 */
export function createMcpServer(client: CocoonClient): McpServer {
  const server = new McpServer({ name: MCP_SERVER_NAME, version: MCP_SERVER_VERSION }, { instructions: INSTRUCTIONS });

  server.registerTool(
    "create_sandbox",
    {
      title: "Create a sandbox",
      description:
        "Creates a sandbox (a microVM) and returns its id once it runs. Defaults: image base (Debian bookworm, minimal), 1 vCPU, 512 MiB, no network.",
      inputSchema: {
        image: z.string().min(1).optional().describe("image name or id (default base)"),
        memoryMiB: z.number().int().optional().describe("memory in MiB, 128-32768 (default 512)"),
        vcpus: z.number().int().optional().describe("virtual CPUs, 1-16 (default 1)"),
        egress: z
          .union([z.enum(["none", "internet"]), z.array(z.string())])
          .optional()
          .describe('outbound network: "none" (default), "internet" (public addresses only), or an allow-list of CIDRs and host names such as ["pypi.org", "*.debian.org"]'),
        env: z.record(z.string(), z.string()).optional().describe("environment variables for every command"),
      },
      annotations: { openWorldHint: false },
    },
    (args) =>
      run(async () => {
        const egress: Egress | undefined = Array.isArray(args.egress) ? { allow: args.egress } : args.egress;
        const vm = await client.microvms.create({
          image: args.image ?? "base",
          ...(args.memoryMiB !== undefined ? { memoryMiB: args.memoryMiB } : {}),
          ...(args.vcpus !== undefined ? { vcpus: args.vcpus } : {}),
          ...(egress !== undefined ? { network: { egress } } : {}),
          ...(args.env ? { env: args.env } : {}),
          metadata: { createdBy: "mcp" },
        });
        return `created sandbox ${vm.id}: ${describeVm(vm.info)}`;
      }),
  );

  server.registerTool(
    "run_command",
    {
      title: "Run a shell command",
      description: "Runs a command through /bin/sh -c in a sandbox and returns its exit code, stdout and stderr once it exits.",
      inputSchema: {
        sandboxId,
        command: z.string().min(1).describe("a shell command line, e.g. 'ls -la /tmp && cat /etc/os-release'"),
        cwd: z.string().optional().describe("working directory (default /root)"),
        env: z.record(z.string(), z.string()).optional().describe("extra environment variables"),
        stdin: z.string().optional().describe("text written to the command's standard input"),
        timeoutSeconds,
      },
    },
    (args) =>
      run(async () => {
        const vm = await client.microvms.get(args.sandboxId);
        return formatExec(await vm.exec(args.command, { cwd: args.cwd, env: args.env, stdin: args.stdin, timeoutSeconds: args.timeoutSeconds }));
      }),
  );

  server.registerTool(
    "run_code",
    {
      title: "Run a code snippet",
      description:
        "Runs a Python (python3 -c), Node.js (node -e) or shell (sh -c) program in a sandbox and returns its exit code, stdout and stderr. " +
        "The interpreter must be in the sandbox's image. Programs up to 64 KiB; for longer ones, write_file then run_command.",
      inputSchema: {
        sandboxId,
        language: z.enum(["python", "node", "shell"]),
        code: z.string().min(1).describe("the program's source"),
        timeoutSeconds,
      },
    },
    (args) =>
      run(async () => {
        const vm = await client.microvms.get(args.sandboxId);
        const [program, flag] = INTERPRETERS[args.language];
        try {
          return formatExec(await vm.exec([program, flag, args.code], { timeoutSeconds: args.timeoutSeconds }));
        } catch (err) {
          if (err instanceof CommandNotFoundError) {
            throw new CocoonError({ code: err.code, status: err.status, message: `${err.message}: image ${vm.info.image} has no ${program}; create a sandbox from an image that has it` });
          }
          throw err;
        }
      }),
  );

  server.registerTool(
    "read_file",
    {
      title: "Read a file",
      description: `Reads a file in a sandbox: up to ${READ_CHUNK_BYTES / 1024} KiB from offset (text as is, binary content as base64); says where to continue when there is more.`,
      inputSchema: {
        sandboxId,
        path: z.string().min(1).describe("absolute path"),
        offset: z.number().int().min(0).optional().describe("byte offset to start at (default 0)"),
      },
      annotations: { readOnlyHint: true },
    },
    (args) =>
      run(async () => {
        const vm = await client.microvms.get(args.sandboxId);
        const offset = args.offset ?? 0;
        const range = await readRange(await vm.files.readStream(args.path), offset, READ_CHUNK_BYTES);
        const binary = range.data.includes(0);
        // Base64 grows by a third: binary content keeps ¾ of the chunk. Text stops
        // before a character the chunk would split. The next call starts where this one stopped.
        const keep = binary ? Math.min(range.data.length, (READ_CHUNK_BYTES / 4) * 3) : range.more ? wholeCharsLength(range.data) || range.data.length : range.data.length;
        const data = range.data.subarray(0, keep);
        const more = range.more || keep < range.data.length;
        const end = offset + data.length;
        const text = binary ? `[binary content, base64]\n${data.toString("base64")}` : data.toString("utf8");
        if (more) return `${text}\n[bytes ${offset}-${end} shown; more follows: call read_file with offset ${end}]`;
        if (offset > 0) return `${text}\n[bytes ${offset}-${end} shown: the end of the file]`;
        return text;
      }),
  );

  server.registerTool(
    "write_file",
    {
      title: "Write a file",
      description: "Writes a file in a sandbox, replacing it; missing parent directories are created.",
      inputSchema: {
        sandboxId,
        path: z.string().min(1).describe("absolute path"),
        content: z.string().describe("the file's content"),
        encoding: z.enum(["utf8", "base64"]).optional().describe("how content is encoded (default utf8)"),
      },
      annotations: { idempotentHint: true },
    },
    (args) =>
      run(async () => {
        const vm = await client.microvms.get(args.sandboxId);
        const written = await vm.files.write(args.path, args.encoding === "base64" ? Buffer.from(args.content, "base64") : args.content);
        return `wrote ${written.size} bytes to ${written.path}`;
      }),
  );

  server.registerTool(
    "list_files",
    {
      title: "List a directory",
      description: "Lists a directory in a sandbox: one entry a line, type, size in bytes and name (directories end with /).",
      inputSchema: { sandboxId, path: z.string().min(1).describe("absolute path of a directory") },
      annotations: { readOnlyHint: true },
    },
    (args) =>
      run(async () => {
        const vm = await client.microvms.get(args.sandboxId);
        const entries = await vm.files.list(args.path);
        const lines = entries.slice(0, MAX_LIST_ENTRIES).map((e) => `${e.type.padEnd(7)} ${String(e.size).padStart(10)}  ${e.name}${e.type === "dir" ? "/" : ""}`);
        if (entries.length > MAX_LIST_ENTRIES) lines.push(`[${entries.length - MAX_LIST_ENTRIES} more entries not shown; narrow it with run_command, e.g. ls ${args.path} | grep …]`);
        return lines.length ? lines.join("\n") : `${args.path} is empty`;
      }),
  );

  for (const [name, title, description, act] of [
    ["suspend_sandbox", "Suspend a sandbox", "Suspends a running sandbox to disk: it holds no CPU or memory until resumed, and keeps its files and processes.", "suspend"],
    ["resume_sandbox", "Resume a sandbox", "Resumes a suspended sandbox exactly where it was (commands also resume it on their own).", "resume"],
  ] as const) {
    server.registerTool(name, { title, description, inputSchema: { sandboxId } }, (args) =>
      run(async () => {
        const vm = await client.microvms[act](args.sandboxId);
        return `sandbox ${vm.id} is ${vm.state}`;
      }),
    );
  }

  server.registerTool(
    "terminate_sandbox",
    {
      title: "Terminate a sandbox",
      description: "Terminates a sandbox: its processes end and its files are deleted. It cannot be undone.",
      inputSchema: { sandboxId },
      annotations: { destructiveHint: true, idempotentHint: true },
    },
    (args) =>
      run(async () => {
        if (!(await client.microvms.terminate(args.sandboxId))) throw new CocoonError({ code: "NotFound", status: 404, message: `microVM ${args.sandboxId} not found` });
        return `sandbox ${args.sandboxId} is TERMINATED`;
      }),
  );

  server.registerTool(
    "list_sandboxes",
    {
      title: "List sandboxes",
      description: "Lists your sandboxes, newest first (terminated ones only when asked): id, state, image, size and age.",
      inputSchema: {
        // The API's states, from its OpenAPI document (never empty: zod wants a non-empty tuple).
        state: z.enum(MICROVM_STATES as readonly [MicroVmState, ...MicroVmState[]]).optional().describe("only sandboxes in this state"),
      },
      annotations: { readOnlyHint: true },
    },
    (args) =>
      run(async () => {
        const state: MicroVmState | undefined = args.state;
        const page = await client.microvms.list({ state, limit: 100 });
        const vms = page.microVms.filter((v) => state || v.state !== "TERMINATED");
        const lines = vms.map((v) => `${v.id}  ${describeVm(v.info)}`);
        if (page.nextToken) lines.push("[only the newest 100 are shown]");
        return lines.length ? lines.join("\n") : "no sandboxes";
      }),
  );

  return server;
}

/** Runs a tool's body: its text as the result, or any error as a tool error with the API's code and message. */
async function run(body: () => Promise<string>): Promise<CallToolResult> {
  try {
    return { content: [{ type: "text", text: await body() }] };
  } catch (err) {
    const text = err instanceof CocoonError ? `${err.code}: ${err.message}` : err instanceof Error ? err.message : String(err);
    return { content: [{ type: "text", text }], isError: true };
  }
}

function describeVm(v: MicroVmInfo): string {
  const egress = typeof v.network?.egress === "object" ? `allow ${v.network.egress.allow.join(", ")}` : (v.network?.egress ?? "none");
  return `${v.state}, image ${v.image}, ${v.vcpus} vCPU, ${v.memoryMiB} MiB, egress ${egress}, created ${v.createdAt}`;
}

/** An exec result for a model: exit status, then stdout and stderr within the output budget. */
function formatExec(result: ExecResult): string {
  const budgets = outputBudgets(result.stdout, result.stderr);
  const status = result.timedOut ? `killed at its timeout (exit code ${result.exitCode})` : `exit code ${result.exitCode}`;
  const section = (name: string, text: string, limit: number) => (text ? `${name}:\n${clip(text, limit, name)}` : `${name}: (empty)`);
  return [`${status}, ${(result.durationMs / 1000).toFixed(1)} s`, section("stdout", result.stdout, budgets.stdout), section("stderr", result.stderr, budgets.stderr)].join("\n");
}

/** Up to `length` bytes from `offset` of a stream, and whether more follows; the rest of the stream is not read. */
async function readRange(stream: ReadableStream<Uint8Array>, offset: number, length: number): Promise<{ data: Buffer; more: boolean }> {
  const chunks: Buffer[] = [];
  let skipped = 0;
  let kept = 0;
  const reader = stream.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return { data: Buffer.concat(chunks), more: false };
      let chunk = Buffer.from(value);
      if (skipped < offset) {
        const skip = Math.min(offset - skipped, chunk.length);
        skipped += skip;
        chunk = chunk.subarray(skip);
      }
      chunks.push(chunk);
      kept += chunk.length;
      if (kept > length) return { data: Buffer.concat(chunks).subarray(0, length), more: true };
    }
  } finally {
    await reader.cancel().catch(() => undefined);
  }
}
