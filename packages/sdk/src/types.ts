/** Resource shapes of the Cocoon API (API.md). The server may add fields; none is removed within v1. */

/** A microVM's lifecycle state. Transitions: PENDING → RUNNING ⇄ (SUSPENDING → SUSPENDED → RESUMING) → TERMINATING → TERMINATED; FAILED from any. */
export type MicroVmState = "PENDING" | "RUNNING" | "SUSPENDING" | "SUSPENDED" | "RESUMING" | "TERMINATING" | "TERMINATED" | "FAILED";

/** Outbound network access: none, the public internet (no host, private or link-local addresses), or an allow-list of CIDRs and host names (`*.debian.org`). */
export type Egress = "none" | "internet" | { allow: string[] };

export interface IdlePolicy {
  /**
   * Suspend the VM after this many seconds without activity (requests, exec, files); `0` never.
   * @default 900
   */
  suspendAfterSeconds?: number;
  /**
   * Resume a suspended VM on its next request or exec.
   * @default true
   */
  autoResume?: boolean;
}

/** What `client.microvms.create` accepts. */
export interface CreateMicroVmOpts {
  /**
   * Image name or id.
   * @default "base" (Debian bookworm with the agent, always READY)
   */
  image?: string;
  /**
   * Virtual CPUs, 1–16.
   * @default 1
   */
  vcpus?: number;
  /**
   * Memory in MiB, 128–32768.
   * @default 512
   */
  memoryMiB?: number;
  /**
   * Disk size in GiB, 1–32.
   * @default the image's disk size
   */
  diskGiB?: number;
  /** Environment variables for commands and the app. */
  env?: Record<string, string>;
  /** Idle auto-suspend and auto-resume. */
  idlePolicy?: IdlePolicy;
  /**
   * The VM is terminated this many seconds after creation; at most 28800 (8 h).
   * @default 28800
   */
  maxRuntimeSeconds?: number;
  network?: {
    /** @default "none" */
    egress?: Egress;
  };
  endpoint?: {
    /**
     * Serve the app's endpoint without a token.
     * @default false
     */
    public?: boolean;
  };
  /** Your own labels, returned as given. */
  metadata?: Record<string, unknown>;
}

/** A microVM as the API describes it (`GET /v1/microvms/{id}`). */
export interface MicroVmInfo {
  microVmId: string;
  /** The image name it was created from. */
  image: string;
  imageId: string;
  state: MicroVmState;
  /** Why it is in its state, e.g. the failure of a FAILED VM. */
  stateReason?: string;
  vcpus: number;
  memoryMiB: number;
  diskGiB: number;
  /** ISO-8601. */
  createdAt: string;
  /** ISO-8601: when max runtime ends the VM. */
  expiresAt: string;
  /** ISO-8601: the last request, exec or file call. */
  lastActivityAt: string;
  terminatedAt?: string;
  idlePolicy: Required<IdlePolicy>;
  maxRuntimeSeconds: number;
  network: { egress: Egress };
  /** `url` is `http://{id}.{domain}:{port}/`; `token` authorizes requests to it; `appPort` is the guest port it reaches. */
  endpoint: { url: string; token?: string; public: boolean; appPort?: number };
  metadata: Record<string, unknown>;
  /** The microVM it was forked from (`fork`). */
  forkedFrom?: string;
  [field: string]: unknown;
}

export interface ListMicroVmsOpts {
  /** Only VMs in this state. */
  state?: MicroVmState;
  /** Only VMs of this image (name or id). */
  image?: string;
  /**
   * Page size, 1–1000.
   * @default 100
   */
  limit?: number;
  /** The `nextToken` of the previous page. */
  nextToken?: string;
}

/** Options of `vm.exec` and `vm.execStream`. */
export interface ExecOpts {
  /** Extra environment variables for this command. */
  env?: Record<string, string>;
  /** Working directory in the VM. */
  cwd?: string;
  /**
   * The user to run as.
   * @default "root"
   */
  user?: string;
  /** Text written to the command's standard input (then closed); at most 512 KiB. */
  stdin?: string;
  /**
   * Kill the command after this many seconds; the result then has `timedOut: true`.
   * @default 60
   */
  timeoutSeconds?: number;
}

export interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
  durationMs: number;
  /** The command was killed at `timeoutSeconds`. */
  timedOut?: boolean;
}

/** One line of a streamed exec: output as it comes, then the exit. */
export type ExecEvent = { type: "stdout"; data: string } | { type: "stderr"; data: string } | { type: "exit"; exitCode: number; durationMs?: number; timedOut?: boolean };

export interface FileEntry {
  name: string;
  type: "file" | "dir" | "symlink" | "other";
  /** Bytes. */
  size: number;
  /** Octal permission bits, e.g. "0644". */
  mode: string;
  /** ISO-8601. */
  mtime: string;
}

export interface WriteInfo {
  path: string;
  /** Bytes written. */
  size: number;
}

export interface MicroVmEvent {
  /** e.g. created, suspended, resumed, terminated. */
  type: string;
  /** Human-readable, e.g. "suspended (idle)". */
  message: string;
  /** ISO-8601. */
  at: string;
}

export type ImageState = "BUILDING" | "READY" | "FAILED" | (string & {});

export interface ImageInfo {
  imageId: string;
  name: string;
  state: ImageState;
  stateReason?: string;
  createdAt: string;
  readyAt?: string;
  sizeBytes?: number;
  appPort?: number;
  dockerfileDigest?: string;
  codeDigest?: string;
  version?: number;
  /** The running microVM this image is a snapshot of (`snapshot`). */
  sourceMicroVmId?: string;
  [field: string]: unknown;
}

/** What `client.images.create` accepts: the Dockerfile and the code as a .zip (uploaded), or a `codeUri` the server fetches. */
export interface CreateImageOpts {
  /** Unique name within the tenant, used by `microvms.create({image})`. */
  name: string;
  /** The Dockerfile's text. */
  dockerfile: string;
  /** The build context as a .zip (bytes or a Blob). Exactly one of `code` and `codeUri`. */
  code?: Uint8Array | Blob;
  /** `s3://bucket/key`, `https://…` or `file://…` (server-local, admin only). */
  codeUri?: string;
}

export interface TenantInfo {
  tenantId: string;
  name: string;
  createdAt: string;
}

export interface CreateKeyOpts {
  /** Tenant id or name. */
  tenant: string;
  /** e.g. `["microvm:*", "image:read"]`; see API.md for the actions. */
  permissions: string[];
  description?: string;
}

export interface CreatedKey {
  keyId: string;
  /** The secret: shown this once, store it. */
  apiKey: string;
  tenantId: string;
  permissions: string[];
  createdAt: string;
}

export interface KeyInfo {
  keyId: string;
  tenantId: string;
  permissions: string[];
  description?: string;
  createdAt: string;
  revokedAt?: string;
}

export interface Health {
  status: string;
  /** `kvm`, or `tcg` (software emulation: much slower VMs). */
  accelerator: "kvm" | "tcg";
  version: string;
}
