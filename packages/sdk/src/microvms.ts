import { NotFoundError, ValidationError } from "./errors.ts";
import { lines, textChunks, type CallOpts, type Transport } from "./http.ts";
import type { CreateMicroVmOpts, ExecEvent, ExecOpts, ExecResult, FileEntry, ImageInfo, ListMicroVmsOpts, MicroVmEvent, MicroVmInfo, MicroVmState, WriteInfo } from "./types.ts";

/** A command: argv (run as is) or a string (run through `/bin/sh -c`). */
export type Command = string | string[];

/** What `files.write` accepts: text (written as UTF-8), bytes, a Blob, or a stream (uploaded as it is read). */
export type FileData = string | Uint8Array | ArrayBuffer | Blob | ReadableStream<Uint8Array>;

const vmPath = (id: string, rest = "") => `/v1/microvms/${encodeURIComponent(id)}${rest}`;

/**
 * Milliseconds the HTTP call waits beyond the command's own `timeoutSeconds`,
 * so that the server's timeout (a result with `timedOut`) answers before the
 * client gives up.
 */
const EXEC_SLACK_MS = 30_000;

/** `client.microvms`: create, find and change microVMs. Each call also exists on the {@link MicroVm} handle. */
export class MicroVms {
  /** @internal */
  constructor(private readonly http: Transport) {}

  /**
   * Creates a microVM and returns once it is RUNNING (launch from the image's snapshot).
   * @throws ValidationError for an out-of-range field (`err.field` names it), NotFoundError for an unknown image, CapacityExceededError when the host is full.
   */
  async create(opts: CreateMicroVmOpts = {}, call?: CallOpts): Promise<MicroVm> {
    const info = await this.http.json<MicroVmInfo>({ method: "POST", path: "/v1/microvms", json: { image: "base", ...opts } }, call);
    return new MicroVm(this.http, info);
  }

  /** Describes a microVM. @throws NotFoundError if it does not exist in the key's tenant. */
  async get(microVmId: string, call?: CallOpts): Promise<MicroVm> {
    return new MicroVm(this.http, await this.describe(microVmId, call));
  }

  /** One page of the tenant's microVMs (terminated ones included), newest first; pass `nextToken` on for the next page. */
  async list(opts: ListMicroVmsOpts = {}, call?: CallOpts): Promise<{ microVms: MicroVm[]; nextToken?: string }> {
    const page = await this.http.json<{ microVms: MicroVmInfo[]; nextToken?: string }>(
      { method: "GET", path: "/v1/microvms", query: { state: opts.state, image: opts.image, limit: opts.limit, nextToken: opts.nextToken } },
      call,
    );
    return { microVms: page.microVms.map((info) => new MicroVm(this.http, info)), ...(page.nextToken ? { nextToken: page.nextToken } : {}) };
  }

  /** Every microVM matching the filters, page after page. */
  async *iterate(opts: Omit<ListMicroVmsOpts, "nextToken"> = {}, call?: CallOpts): AsyncGenerator<MicroVm> {
    let nextToken: string | undefined;
    do {
      const page = await this.list({ ...opts, nextToken }, call);
      yield* page.microVms;
      nextToken = page.nextToken;
    } while (nextToken);
  }

  /** Suspends a RUNNING VM to disk (state SUSPENDED; no CPU or memory held). @throws InvalidStateError if it is not RUNNING. */
  async suspend(microVmId: string, call?: CallOpts): Promise<MicroVm> {
    return new MicroVm(this.http, await this.http.json<MicroVmInfo>({ method: "POST", path: vmPath(microVmId, "/suspend") }, call));
  }

  /** Resumes a SUSPENDED VM exactly where it was (state RUNNING). @throws InvalidStateError if it is not SUSPENDED. */
  async resume(microVmId: string, call?: CallOpts): Promise<MicroVm> {
    return new MicroVm(this.http, await this.http.json<MicroVmInfo>({ method: "POST", path: vmPath(microVmId, "/resume") }, call));
  }

  /**
   * Forks a RUNNING VM into `count` (1–16) new VMs with its memory, processes
   * and disk of this instant, each with an identity of its own; the parent runs on.
   * @throws ValidationError for a bad count, InvalidStateError if it is not RUNNING, CapacityExceededError when the host cannot take them.
   */
  async fork(microVmId: string, opts: { count?: number } = {}, call?: CallOpts): Promise<MicroVm[]> {
    const res = await this.http.json<{ microVms: MicroVmInfo[] }>({ method: "POST", path: vmPath(microVmId, "/fork"), json: { count: opts.count ?? 1 } }, call);
    return res.microVms.map((info) => new MicroVm(this.http, info));
  }

  /**
   * Snapshots a RUNNING VM (memory and disk, as they are now) into a new
   * version of image `name`, launchable with `create({image: name})`; the VM runs on.
   * @throws ValidationError for a bad name, InvalidStateError if it is not RUNNING, QuotaExceededError past the tenant's image quota.
   */
  async snapshot(microVmId: string, name: string, call?: CallOpts): Promise<ImageInfo> {
    return this.http.json<ImageInfo>({ method: "POST", path: vmPath(microVmId, "/snapshots"), json: { name } }, call);
  }

  /**
   * Terminates a microVM: its process ends and its files are removed; it stays listed as TERMINATED.
   * @returns true if it was terminated, false if it does not exist (404), like E2B's `kill`.
   */
  async terminate(microVmId: string, call?: CallOpts): Promise<boolean> {
    try {
      await this.http.json({ method: "DELETE", path: vmPath(microVmId) }, call);
      return true;
    } catch (err) {
      if (err instanceof NotFoundError) return false;
      throw err;
    }
  }

  /** @internal */
  describe(microVmId: string, call?: CallOpts): Promise<MicroVmInfo> {
    return this.http.json<MicroVmInfo>({ method: "GET", path: vmPath(microVmId) }, call);
  }
}

/**
 * A handle on one microVM, returned by `microvms.create/get/list`. `info` is
 * the description as of the last call that returned it; `refresh()` reloads it.
 */
export class MicroVm {
  /** Files in the VM. Needs the VM RUNNING (or SUSPENDED with auto-resume off: 409). */
  readonly files: Files;
  private current: MicroVmInfo;

  /** @internal */
  constructor(
    private readonly http: Transport,
    info: MicroVmInfo,
  ) {
    this.current = info;
    this.files = new Files(http, info.microVmId);
  }

  /** The microVM's id. */
  get id(): string {
    return this.current.microVmId;
  }

  /** The state as of the last call that described the VM. */
  get state(): MicroVmState {
    return this.current.state;
  }

  /** The description as of the last call that returned one. */
  get info(): MicroVmInfo {
    return this.current;
  }

  /** Reloads `info` from the server. */
  async refresh(call?: CallOpts): Promise<MicroVmInfo> {
    this.current = await this.http.json<MicroVmInfo>({ method: "GET", path: vmPath(this.id) }, call);
    return this.current;
  }

  /**
   * Runs a command and returns its whole output once it exits. A non-zero exit
   * is a result, not an error. A SUSPENDED VM with auto-resume is resumed first.
   * Unless `call.timeoutMs` is given, the call waits at least the command's
   * own `timeoutSeconds` plus 30 s.
   * @throws CommandNotFoundError if the program does not exist in the VM.
   */
  async exec(command: Command, opts: ExecOpts = {}, call: CallOpts = {}): Promise<ExecResult> {
    return this.http.json<ExecResult>({ method: "POST", path: vmPath(this.id, "/exec"), json: { command, ...opts } }, { ...call, timeoutMs: call.timeoutMs ?? execTimeoutMs(opts, this.http.config.timeoutMs) });
  }

  /**
   * Runs a command and yields its output as it comes (NDJSON from the server),
   * ending with one `{type: "exit"}` event. Breaking out of the loop (or
   * aborting `signal`) closes the request, which kills the command.
   * `call.timeoutMs` bounds only the wait for the command to start.
   */
  async *execStream(command: Command, opts: ExecOpts = {}, call: CallOpts = {}): AsyncGenerator<ExecEvent> {
    const { body } = await this.http.stream(
      { method: "POST", path: vmPath(this.id, "/exec"), json: { command, ...opts }, accept: "application/x-ndjson" },
      call,
    );
    for await (const line of lines(body)) {
      const msg = JSON.parse(line) as { stdout?: string; stderr?: string; exitCode?: number; durationMs?: number; timedOut?: boolean };
      if (msg.stdout !== undefined) yield { type: "stdout", data: msg.stdout };
      else if (msg.stderr !== undefined) yield { type: "stderr", data: msg.stderr };
      else if (msg.exitCode !== undefined) {
        yield { type: "exit", exitCode: msg.exitCode, ...(msg.durationMs !== undefined ? { durationMs: msg.durationMs } : {}), ...(msg.timedOut ? { timedOut: true } : {}) };
      }
    }
  }

  /** Suspends the VM to disk; `info` is updated. @throws InvalidStateError if it is not RUNNING. */
  async suspend(call?: CallOpts): Promise<MicroVmInfo> {
    this.current = await this.http.json<MicroVmInfo>({ method: "POST", path: vmPath(this.id, "/suspend") }, call);
    return this.current;
  }

  /** Resumes the VM where it was; `info` is updated. @throws InvalidStateError if it is not SUSPENDED. */
  async resume(call?: CallOpts): Promise<MicroVmInfo> {
    this.current = await this.http.json<MicroVmInfo>({ method: "POST", path: vmPath(this.id, "/resume") }, call);
    return this.current;
  }

  /** Forks the VM into `count` new ones (see `microvms.fork`). */
  async fork(opts: { count?: number } = {}, call?: CallOpts): Promise<MicroVm[]> {
    return new MicroVms(this.http).fork(this.id, opts, call);
  }

  /** Snapshots the VM into a new version of image `name` (see `microvms.snapshot`). */
  async snapshot(name: string, call?: CallOpts): Promise<ImageInfo> {
    return new MicroVms(this.http).snapshot(this.id, name, call);
  }

  /** Terminates the VM. @returns false if it no longer exists (404), true otherwise. */
  async terminate(call?: CallOpts): Promise<boolean> {
    try {
      this.current = await this.http.json<MicroVmInfo>({ method: "DELETE", path: vmPath(this.id) }, call);
      return true;
    } catch (err) {
      if (err instanceof NotFoundError) return false;
      throw err;
    }
  }

  /** The VM's lifecycle events, oldest first: created, suspended (idle), resumed (request), terminated (max runtime), … */
  async events(call?: CallOpts): Promise<MicroVmEvent[]> {
    return (await this.http.json<{ events: MicroVmEvent[] }>({ method: "GET", path: vmPath(this.id, "/events") }, call)).events;
  }

  /**
   * Console and application output as text chunks (`GET …/logs`); with
   * `follow: true` it goes on until the VM ends or `signal` aborts.
   * `call.timeoutMs` bounds only the wait for the first byte.
   */
  async *logs(opts: { follow?: boolean } = {}, call: CallOpts = {}): AsyncGenerator<string> {
    const { body } = await this.http.stream({ method: "GET", path: vmPath(this.id, "/logs"), query: { follow: opts.follow ? "true" : undefined } }, call);
    yield* textChunks(body);
  }
}

/** `vm.files`: read, write, list and remove files in the VM. Paths are absolute; every call counts as activity. */
export class Files {
  /** @internal */
  constructor(
    private readonly http: Transport,
    private readonly microVmId: string,
  ) {}

  /** A file's bytes. @throws NotFoundError if it does not exist, ValidationError if it is a directory (use `list`). */
  async read(path: string, call?: CallOpts): Promise<Uint8Array> {
    const { data, contentType } = await this.http.bytes({ method: "GET", path: vmPath(this.microVmId, "/files"), query: { path } }, call);
    if (contentType.includes("application/json")) throw notAFile(path);
    return data;
  }

  /** A file's content decoded as UTF-8. */
  async readText(path: string, call?: CallOpts): Promise<string> {
    return new TextDecoder().decode(await this.read(path, call));
  }

  /** A file as a stream, for large files; `call.timeoutMs` bounds only the wait for the first byte. */
  async readStream(path: string, call?: CallOpts): Promise<ReadableStream<Uint8Array>> {
    const { res, body } = await this.http.stream({ method: "GET", path: vmPath(this.microVmId, "/files"), query: { path } }, call);
    if ((res.headers.get("content-type") ?? "").includes("application/json")) {
      await body.cancel();
      throw notAFile(path);
    }
    return body;
  }

  /** Writes a file, replacing it atomically; missing parent directories are created. */
  async write(path: string, data: FileData, call?: CallOpts): Promise<WriteInfo> {
    // Node's BodyInit takes every FileData; TypeScript's lib narrows Uint8Array to ArrayBuffer-backed ones.
    const body = (typeof data === "string" ? new TextEncoder().encode(data) : data) as BodyInit;
    return this.http.json<WriteInfo>({ method: "PUT", path: vmPath(this.microVmId, "/files"), query: { path }, body, contentType: "application/octet-stream" }, call);
  }

  /** A directory's entries. @throws NotFoundError if it does not exist, ValidationError if it is a file. */
  async list(path: string, call?: CallOpts): Promise<FileEntry[]> {
    const { data, contentType } = await this.http.bytes({ method: "GET", path: vmPath(this.microVmId, "/files"), query: { path } }, call);
    if (!contentType.includes("application/json")) {
      throw new ValidationError({ code: "ValidationError", status: 400, message: `${path} is a file, not a directory`, details: { field: "path" } });
    }
    return (JSON.parse(new TextDecoder().decode(data)) as { entries: FileEntry[] }).entries;
  }

  /** Removes a file, or a directory with everything in it. @throws NotFoundError if it does not exist. */
  async remove(path: string, call?: CallOpts): Promise<void> {
    await this.http.json({ method: "DELETE", path: vmPath(this.microVmId, "/files"), query: { path } }, call);
  }
}

function notAFile(path: string): ValidationError {
  return new ValidationError({ code: "ValidationError", status: 400, message: `${path} is a directory; use files.list`, details: { field: "path" } });
}

/** The client's timeout, stretched to outlast the command's; 0 (wait forever) stays 0. */
function execTimeoutMs(opts: ExecOpts, clientTimeoutMs: number): number {
  if (clientTimeoutMs === 0) return 0;
  return Math.max(clientTimeoutMs, Math.round((opts.timeoutSeconds ?? 60) * 1000) + EXEC_SLACK_MS);
}
