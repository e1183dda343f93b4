import { createReadStream, createWriteStream } from "node:fs";
import { stat } from "node:fs/promises";
import { basename, join } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ReadableStream as NodeReadableStream } from "node:stream/web";
import { InvalidArgumentError, Option, type Command } from "commander";
import type { CreateMicroVmOpts, Egress, MicroVm, MicroVmInfo, MicroVmState } from "@cocoon/sdk";
import { makeClient, resolveApiKey } from "../config.ts";
import { openShell } from "../shell.ts";
import { CliError, globals, intOption, keyValue } from "../common.ts";
import { age, printFields, printJson, printTable, seconds, withProgress } from "../output.ts";

/** `cocoon vm …`: microVMs over the API. */
export function registerVmCommands(program: Command): void {
  const vm = program.command("vm").description("create, inspect and use microVMs");

  vm.command("create")
    .description("create a microVM and wait until it is RUNNING")
    .option("--image <name>", "image name or id", "base")
    .option("--vcpus <n>", "virtual CPUs, 1-16 (default 1)", intOption)
    .option("--memory <MiB>", "memory in MiB, 128-32768 (default 512)", intOption)
    .option("--disk <GiB>", "disk size in GiB, 1-32 (default: the image's)", intOption)
    .option("-e, --env <KEY=VALUE>", "environment variable (repeatable)", keyValue)
    .option("--idle-suspend <seconds>", "suspend after this many idle seconds, 0 never (default 900)", intOption)
    .option("--no-auto-resume", "do not resume a suspended VM on the next request or exec")
    .option("--max-runtime <seconds>", "terminate this long after creation, at most 28800 (default 28800)", intOption)
    .addOption(new Option("--on-node-failure <policy>", "cluster: when its node fails while it runs, fail it, or restore it elsewhere from its last published suspend (default fail)").choices(["fail", "restore"]))
    .option("--egress <policy>", "none, internet, or a comma-separated allow-list of CIDRs and host names (default none)")
    .option("--public", "serve the app's endpoint without a token")
    .option("-m, --metadata <KEY=VALUE>", "metadata label (repeatable)", keyValue)
    .option("-v, --volume <NAME:PATH[:ro]>", "attach a persistent volume at PATH in the guest, read-only with :ro (repeatable, at most 4)", volumeOption)
    .action(async (o: CreateFlags, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const { result: created, elapsedMs } = await withProgress(`creating microVM from ${o.image}`, () => client.microvms.create(createRequest(o)));
      if (g.json) return printJson(created.info);
      printVm(created.info);
      process.stderr.write(`created in ${seconds(elapsedMs)}\n`);
    });

  vm.command("ls")
    .alias("list")
    .description("list microVMs (terminated ones only with --all)")
    .option("-a, --all", "include TERMINATED microVMs")
    .option("--state <state>", "only microVMs in this state")
    .option("--image <name>", "only microVMs of this image")
    .action(async (o: { all?: boolean; state?: MicroVmState; image?: string }, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const vms: MicroVmInfo[] = [];
      for await (const v of client.microvms.iterate({ state: o.state, image: o.image })) {
        if (o.all || o.state || v.state !== "TERMINATED") vms.push(v.info);
      }
      if (g.json) return printJson(vms);
      printTable(
        ["ID", "IMAGE", "STATE", "VCPUS", "MEMORY", "CREATED"],
        vms.map((v) => [v.microVmId, v.image, v.state, String(v.vcpus), `${v.memoryMiB} MiB`, `${age(v.createdAt)} ago`]),
      );
    });

  vm.command("get")
    .alias("inspect")
    .description("describe a microVM")
    .argument("<id>", "microVM id")
    .action(async (id: string, _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const found = await client.microvms.get(id);
      if (g.json) return printJson(found.info);
      printVm(found.info);
    });

  for (const action of ["suspend", "resume"] as const) {
    vm.command(action)
      .description(action === "suspend" ? "suspend a RUNNING microVM to disk" : "resume a SUSPENDED microVM where it was")
      .argument("<id>", "microVM id")
      .action(async (id: string, _o: unknown, cmd: Command) => {
        const g = globals(cmd);
        const { client } = await makeClient(g);
        const verb = action === "suspend" ? "suspending" : "resuming";
        const { result, elapsedMs } = await withProgress(`${verb} ${id}`, () => client.microvms[action](id));
        if (g.json) return printJson(result.info);
        process.stdout.write(`${result.id} ${result.state} (${seconds(elapsedMs)})\n`);
      });
  }

  vm.command("fork")
    .description("fork a RUNNING microVM: new VMs with its memory, processes and disk of this instant (it runs on)")
    .argument("<id>", "microVM id")
    .option("-n, --count <n>", "how many, 1-16 (default 1)", intOption)
    .action(async (id: string, o: { count?: number }, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const { result, elapsedMs } = await withProgress(`forking ${id}`, () => client.microvms.fork(id, { count: o.count }));
      if (g.json) return printJson(result.map((v) => v.info));
      for (const child of result) process.stdout.write(`${child.id} ${child.state}\n`);
      process.stderr.write(`forked in ${seconds(elapsedMs)}\n`);
    });

  vm.command("snapshot")
    .description("snapshot a RUNNING microVM (memory and disk) into a new version of an image; it runs on")
    .argument("<id>", "microVM id")
    .argument("<name>", "image name (a new version if it exists)")
    .action(async (id: string, name: string, _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const { result, elapsedMs } = await withProgress(`snapshotting ${id}`, () => client.microvms.snapshot(id, name));
      if (g.json) return printJson(result);
      process.stdout.write(`${result.imageId} ${result.name} version ${String(result.version)} ${result.state} (${seconds(elapsedMs)})\n`);
    });

  vm.command("rm")
    .alias("terminate")
    .description("terminate microVMs (their files are removed; they stay listed as TERMINATED)")
    .argument("<ids...>", "microVM ids")
    .action(async (ids: string[], _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const missing: string[] = [];
      for (const id of ids) {
        if (await client.microvms.terminate(id)) {
          if (!g.json) process.stdout.write(`${id}\n`);
        } else missing.push(id);
      }
      if (g.json) printJson({ terminated: ids.filter((id) => !missing.includes(id)), notFound: missing });
      if (missing.length) throw new CliError(`no such microVM: ${missing.join(", ")}`);
    });

  vm.command("exec")
    .description("run a command in a microVM, stream its output, and exit with its exit code")
    .argument("<id>", "microVM id")
    .argument("<command...>", "the command and its arguments, after --  (one argument runs through /bin/sh -c)")
    .option("-e, --env <KEY=VALUE>", "environment variable (repeatable)", keyValue)
    .option("-w, --cwd <dir>", "working directory in the VM")
    .option("-u, --user <user>", "user to run as (default root)")
    .option("-t, --timeout <seconds>", "kill the command after this many seconds (default 60)", intOption)
    .option("-i, --stdin", "send this process's standard input (read to the end first) to the command")
    .usage("[options] <id> -- <command> [args...]")
    .action(async (id: string, argv: string[], o: { env?: Record<string, string>; cwd?: string; user?: string; timeout?: number; stdin?: boolean }, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const target = await client.microvms.get(id);
      const command = argv.length === 1 ? argv[0]! : argv;
      const opts = {
        env: o.env,
        cwd: o.cwd,
        user: o.user,
        timeoutSeconds: o.timeout,
        stdin: o.stdin ? await readStdin() : undefined,
      };
      if (g.json) {
        const result = await target.exec(command, opts);
        printJson(result);
        process.exitCode = result.exitCode;
        return;
      }
      // Ctrl-C closes the request, which kills the command in the VM.
      const abort = new AbortController();
      const onSigint = () => abort.abort();
      process.once("SIGINT", onSigint);
      try {
        for await (const ev of target.execStream(command, opts, { signal: abort.signal })) {
          if (ev.type === "stdout") process.stdout.write(ev.data);
          else if (ev.type === "stderr") process.stderr.write(ev.data);
          else {
            if (ev.timedOut) process.stderr.write(`cocoon: the command timed out after ${o.timeout ?? 60} s and was killed\n`);
            process.exitCode = ev.exitCode;
            return;
          }
        }
        throw new CliError("the command's output ended before it exited");
      } catch (err) {
        if (abort.signal.aborted) {
          process.exitCode = 130;
          return;
        }
        throw err;
      } finally {
        process.off("SIGINT", onSigint);
      }
    });

  vm.command("cp")
    .description("copy a file between here and a microVM: ./f ID:/path, or ID:/path ./f (- for stdin/stdout)")
    .argument("<source>", "local path, - for stdin, or ID:/path")
    .argument("<destination>", "local path, - for stdout, or ID:/path")
    .action(async (source: string, destination: string, _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const from = parseRemote(source);
      const to = parseRemote(destination);
      if (Boolean(from) === Boolean(to)) throw new CliError("vm cp needs exactly one side as ID:/path (e.g. cocoon vm cp ./app.py vm-123:/app/app.py)");
      const { client } = await makeClient(g);
      let result: { source: string; destination: string; size: number };
      if (to) result = await upload(await client.microvms.get(to.id), source, to.path);
      else result = await download(await client.microvms.get(from!.id), from!.path, destination);
      if (g.json) printJson(result);
      else if (destination !== "-") process.stderr.write(`copied ${result.source} → ${result.destination} (${result.size} bytes)\n`);
    });

  vm.command("logs")
    .description("print a microVM's console and application output (GET …/logs; needs a server that serves it)")
    .argument("<id>", "microVM id")
    .option("-f, --follow", "keep printing new output until the VM ends or Ctrl-C")
    .action(async (id: string, o: { follow?: boolean }, cmd: Command) => {
      const { client } = await makeClient(globals(cmd));
      const target = await client.microvms.get(id);
      for await (const chunk of target.logs({ follow: o.follow })) process.stdout.write(chunk);
    });

  vm.command("shell")
    .description("open an interactive shell in a microVM (a PTY over the terminal WebSocket); exits with the shell's status")
    .argument("<id>", "microVM id")
    .action(async (id: string, _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      // Describe first: an unknown VM or a bad key is a plain one-line error, not a failed upgrade.
      await client.microvms.get(id);
      const { apiKey } = await resolveApiKey(g);
      process.exitCode = await openShell(client.baseUrl, id, apiKey);
    });

  vm.command("events")
    .description("list a microVM's lifecycle events")
    .argument("<id>", "microVM id")
    .action(async (id: string, _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const events = await (await client.microvms.get(id)).events();
      if (g.json) return printJson(events);
      printTable(["AT", "TYPE", "MESSAGE"], events.map((e) => [e.at, e.type, e.message]));
    });
}

interface CreateFlags {
  image: string;
  vcpus?: number;
  memory?: number;
  disk?: number;
  env?: Record<string, string>;
  idleSuspend?: number;
  autoResume: boolean;
  maxRuntime?: number;
  onNodeFailure?: "fail" | "restore";
  egress?: string;
  public?: boolean;
  metadata?: Record<string, string>;
  volume?: NonNullable<CreateMicroVmOpts["volumes"]>;
}

/** Commander parser for a repeatable `--volume NAME:PATH[:ro]`. */
function volumeOption(value: string, previous: CreateFlags["volume"]): NonNullable<CreateFlags["volume"]> {
  const [name, path, mode, ...rest] = value.split(":");
  if (!name || !path || rest.length > 0 || (mode !== undefined && mode !== "ro" && mode !== "rw")) throw new InvalidArgumentError("expected NAME:PATH, NAME:PATH:ro or NAME:PATH:rw");
  return [...(previous ?? []), { name, path, ...(mode === "ro" ? { readOnly: true } : {}) }];
}

function createRequest(o: CreateFlags): CreateMicroVmOpts {
  const req: CreateMicroVmOpts = { image: o.image };
  if (o.vcpus !== undefined) req.vcpus = o.vcpus;
  if (o.memory !== undefined) req.memoryMiB = o.memory;
  if (o.disk !== undefined) req.diskGiB = o.disk;
  if (o.env) req.env = o.env;
  if (o.idleSuspend !== undefined || !o.autoResume) {
    req.idlePolicy = { ...(o.idleSuspend !== undefined ? { suspendAfterSeconds: o.idleSuspend } : {}), ...(o.autoResume ? {} : { autoResume: false }) };
  }
  if (o.maxRuntime !== undefined) req.maxRuntimeSeconds = o.maxRuntime;
  if (o.onNodeFailure !== undefined) req.onNodeFailure = o.onNodeFailure;
  if (o.egress !== undefined) req.network = { egress: parseEgress(o.egress) };
  if (o.public) req.endpoint = { public: true };
  if (o.metadata) req.metadata = o.metadata;
  if (o.volume) req.volumes = o.volume;
  return req;
}

function parseEgress(value: string): Egress {
  if (value === "none" || value === "internet") return value;
  const allow = value.split(",").map((s) => s.trim()).filter(Boolean);
  if (!allow.length) throw new InvalidArgumentError("--egress must be none, internet, or a comma-separated allow-list");
  return { allow };
}

function printVm(v: MicroVmInfo): void {
  printFields([
    ["id", v.microVmId],
    ["image", v.image],
    ["state", v.stateReason ? `${v.state} (${v.stateReason})` : v.state],
    ["vcpus", v.vcpus],
    ["memory", `${v.memoryMiB} MiB`],
    ["disk", `${v.diskGiB} GiB`],
    ["created", v.createdAt],
    ["expires", v.expiresAt],
    ["last activity", v.lastActivityAt],
    ["idle suspend", v.idlePolicy?.suspendAfterSeconds ? `after ${v.idlePolicy.suspendAfterSeconds} s${v.idlePolicy.autoResume ? ", auto-resume" : ""}` : "never"],
    ["egress", typeof v.network?.egress === "object" ? `allow ${v.network.egress.allow.join(", ")}` : v.network?.egress],
    ["endpoint", v.endpoint?.url],
    ["metadata", Object.keys(v.metadata ?? {}).length ? JSON.stringify(v.metadata) : undefined],
  ]);
}

/** `ID:/abs/path` → its parts; anything else (./f, /tmp/f, -) is local. */
function parseRemote(arg: string): { id: string; path: string } | undefined {
  const m = /^([A-Za-z0-9][A-Za-z0-9_-]*):(\/.*)$/.exec(arg);
  return m ? { id: m[1]!, path: m[2]! } : undefined;
}

async function upload(target: MicroVm, local: string, remote: string) {
  let body: ReadableStream<Uint8Array>;
  if (local === "-") body = Readable.toWeb(process.stdin) as ReadableStream<Uint8Array>;
  else {
    const info = await stat(local).catch(() => undefined);
    if (!info) throw new CliError(`${local}: no such file`);
    if (!info.isFile()) throw new CliError(`${local} is not a regular file (directories are not supported)`);
    body = Readable.toWeb(createReadStream(local)) as ReadableStream<Uint8Array>;
  }
  // A directory target (trailing slash) keeps the file's name, like cp.
  const path = remote.endsWith("/") && local !== "-" ? `${remote}${basename(local)}` : remote;
  const written = await target.files.write(path, body);
  return { source: local, destination: `${target.id}:${written.path}`, size: written.size };
}

async function download(target: MicroVm, remote: string, local: string) {
  const stream = await target.files.readStream(remote);
  let size = 0;
  const counter = new TransformStream<Uint8Array, Uint8Array>({
    transform(chunk, controller) {
      size += chunk.length;
      controller.enqueue(chunk);
    },
  });
  const counted = Readable.fromWeb(stream.pipeThrough(counter) as NodeReadableStream<Uint8Array>);
  if (local === "-") {
    await pipeline(counted, process.stdout, { end: false });
    return { source: `${target.id}:${remote}`, destination: "-", size };
  }
  const isDir = (await stat(local).catch(() => undefined))?.isDirectory() ?? false;
  const path = isDir ? join(local, basename(remote)) : local;
  await pipeline(counted, createWriteStream(path));
  return { source: `${target.id}:${remote}`, destination: path, size };
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString();
}
