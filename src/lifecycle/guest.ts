import { constants, type FileHandle, open } from "node:fs/promises";
import { connect, type Socket } from "node:net";
import { PassThrough, type Readable, type Writable } from "node:stream";
import { ApiError } from "../errors.ts";
import type { VmSampler, VmMetrics } from "../telemetry/vm-samples.ts";
import { drained } from "../util/streams.ts";
import type { ExecEvent, ExecRequest, ExecResult, FileEntry } from "../vmm/agent-client.ts";
import { PtySession } from "../vmm/pty-frames.ts";
import { AGENT_PORT, machinePaths } from "../vmm/qemu.ts";
import type { MicroVmService } from "./microvms.ts";

export type { ExecEvent, ExecRequest, ExecResult, FileEntry, PtySession, VmMetrics };

/** While an exec runs, its VM counts as active this often (the idle policy counts in seconds). */
const ACTIVE_EVERY_MS = 5_000;

/**
 * The guest side of a tenant's VM, for the API and the endpoint router: exec,
 * files, terminal, logs, metrics and connections to its ports. Each call finds
 * the VM in the tenant (another tenant's is NotFound), and the calls that act
 * in the guest resume a SUSPENDED VM when allowed and count as activity;
 * logs and metrics only look. Guest refusals surface as AgentError, mapped to
 * API errors by the API alone.
 */
export class GuestService {
  constructor(
    private readonly microvms: MicroVmService,
    private readonly sampler: VmSampler,
  ) {}

  /** Runs a command, yielding its output as it comes; the caller's pace is the guest's (back-pressure). */
  async *execStream(tenantId: string, id: string, req: ExecRequest, signal?: AbortSignal): AsyncGenerator<ExecEvent> {
    const vm = await this.microvms.runningVm(tenantId, id, "exec in");
    const active = setInterval(() => void this.microvms.touch(id), ACTIVE_EVERY_MS);
    try {
      yield* vm.agent.execStream(req, signal);
    } finally {
      clearInterval(active);
    }
  }

  /**
   * Runs a command to completion; output past the agent client's cap, or
   * that `keep` refuses (the caller's memory budget), is dropped and flagged `truncated`.
   */
  async exec(tenantId: string, id: string, req: ExecRequest, opts: { signal?: AbortSignal; keep?: (chunk: Buffer) => boolean } = {}): Promise<ExecResult> {
    const vm = await this.microvms.runningVm(tenantId, id, "exec in");
    const active = setInterval(() => void this.microvms.touch(id), ACTIVE_EVERY_MS);
    try {
      return await vm.agent.exec(req, opts.signal, opts.keep);
    } finally {
      clearInterval(active);
    }
  }

  /** A directory's entries, or a file's bytes as a stream. */
  async read(tenantId: string, id: string, path: string): Promise<{ entries: FileEntry[] } | { file: Readable; sizeBytes: number }> {
    const vm = await this.microvms.runningVm(tenantId, id, "read files in");
    if ((await vm.agent.stat(path)).type === "dir") return { entries: await vm.agent.list(path) };
    const file = await vm.agent.readFile(path);
    return { file, sizeBytes: Number(file.headers["content-length"] ?? 0) };
  }

  async write(tenantId: string, id: string, path: string, body: Readable | Buffer): Promise<{ path: string; size: number }> {
    const vm = await this.microvms.runningVm(tenantId, id, "write files in");
    return vm.agent.writeFile(path, body);
  }

  async remove(tenantId: string, id: string, path: string): Promise<void> {
    const vm = await this.microvms.runningVm(tenantId, id, "remove files in");
    await vm.agent.remove(path, true);
  }

  /** An interactive shell; its input counts as activity. */
  async terminal(tenantId: string, id: string, size: { cols: number; rows: number }): Promise<PtySession> {
    const vm = await this.microvms.runningVm(tenantId, id, "open a terminal in");
    return new PtySession(await vm.agent.pty(size), { onInput: () => void this.microvms.touch(id) });
  }

  /**
   * The VM's console (what the guest printed on its serial port), then the
   * app's output; with `follow`, both as they grow until `out` closes. Written
   * with back-pressure: a slow reader slows the copy, it does not buffer it.
   */
  async logs(tenantId: string, id: string, follow: boolean): Promise<Readable> {
    const { row, vm } = await this.microvms.peek(tenantId, id);
    const out = new PassThrough();
    if (!vm) return out.end();
    const running = row.state === "RUNNING";
    void (async () => {
      const consolePath = machinePaths(vm.dir).console;
      let offset = await copyFileTail(consolePath, 0, out);
      if (!follow) {
        const app = running ? await vm.agent.logs(false).catch(() => undefined) : undefined; // the agent may be restarting
        if (app && !out.destroyed) app.pipe(out);
        else out.end();
        return;
      }
      if (running) {
        // The app's stream may not start until the app prints: attach it when it does.
        void vm.agent.logs(true).then(
          (app) => {
            if (out.destroyed || out.writableEnded) app.destroy();
            else {
              app.pipe(out, { end: false });
              out.once("close", () => app.destroy());
            }
          },
          () => undefined,
        );
      }
      while (!out.destroyed) {
        await new Promise((r) => setTimeout(r, 500));
        offset = await copyFileTail(consolePath, offset, out);
      }
    })().catch((err: Error) => out.destroy(err));
    return out;
  }

  /** Current and recent resource figures; a VM that is not running reports its past samples only. */
  async metrics(tenantId: string, id: string): Promise<VmMetrics> {
    const { row, vm } = await this.microvms.peek(tenantId, id);
    return row.state === "RUNNING" && vm ? this.sampler.sample(vm.id, vm.agent) : this.sampler.recent(row.id);
  }

  /**
   * A TCP connection to `port` in the guest (resumed first when allowed):
   * the VM's forwarded app port directly, any other port through the agent's
   * tunnel. The agent's own port is not reachable.
   */
  async connect(tenantId: string, id: string, port: number): Promise<Socket> {
    checkPort(id, port);
    const vm = await this.microvms.runningVm(tenantId, id, "serve a request to");
    const hostPort = vm.hostPort(port);
    return hostPort ? connectLoopback(hostPort) : vm.agent.tunnel(port);
  }

  /** Records endpoint traffic (a relayed WebSocket's messages) as activity. */
  touch(id: string): void {
    void this.microvms.touch(id);
  }
}

function connectLoopback(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.off("error", reject);
      resolve(socket);
    });
    socket.once("error", reject);
  });
}

/** NotFound for a guest port no endpoint reaches: the agent's own. */
export function checkPort(id: string, port: number): void {
  if (port === AGENT_PORT) throw new ApiError("NotFound", `port ${port} of microVM ${id} is its agent's and not reachable`);
}

/**
 * Writes what `path` holds from `offset` to its current end into `out`,
 * waiting for `out` to drain; returns the new end (unchanged if the file is
 * gone). The file sits in a directory the VM's uid can write: opened without
 * following a symlink and without blocking on a FIFO, and read only if it is
 * a regular file.
 */
async function copyFileTail(path: string, offset: number, out: Writable): Promise<number> {
  let fh: FileHandle | undefined;
  try {
    fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch {
    return offset;
  }
  try {
    const stat = await fh.stat();
    if (!stat.isFile()) return offset;
    let at = stat.size < offset ? 0 : offset; // truncated: start again
    const buf = Buffer.alloc(1 << 16);
    while (at < stat.size && !out.destroyed) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, stat.size - at), at);
      if (bytesRead === 0) break;
      at += bytesRead;
      if (!out.write(Buffer.from(buf.subarray(0, bytesRead)))) await drained(out);
    }
    return at;
  } finally {
    await fh.close();
  }
}
