import { Keys, Tenants } from "./admin.ts";
import { Transport, type CallOpts } from "./http.ts";
import { Images } from "./images.ts";
import { MicroVms } from "./microvms.ts";
import type { Health } from "./types.ts";
import { Volumes } from "./volumes.ts";

/** Options of {@link CocoonClient}. */
export interface CocoonClientOpts {
  /**
   * The server's base URL.
   * @default process.env.COCOON_URL, else "http://127.0.0.1:7070"
   */
  baseUrl?: string;
  /**
   * The API key sent as `Authorization: Bearer`.
   * @default process.env.COCOON_API_KEY
   */
  apiKey?: string;
  /**
   * Default for every call's `timeoutMs`, in milliseconds; `0` waits forever.
   * Creating a VM waits until it runs, so keep this well above a launch time.
   * @default 120000
   */
  timeoutMs?: number;
  /**
   * The fetch to use (tests, proxies, instrumentation).
   * @default globalThis.fetch
   */
  fetch?: typeof fetch;
}

/** Default for every call's timeout: 2 minutes. */
export const DEFAULT_TIMEOUT_MS = 120_000;

/**
 * A client of one Cocoon server. Stateless apart from its options: share one
 * per process.
 *
 * ```ts
 * const client = new CocoonClient();
 * const vm = await client.microvms.create({ memoryMiB: 1024 });
 * const { stdout } = await vm.exec(["python3", "-c", "print(1)"]);
 * await vm.terminate();
 * ```
 */
export class CocoonClient {
  /** MicroVMs: create, get, list, suspend, resume, terminate; exec and files on the returned handle. */
  readonly microvms: MicroVms;
  /** Images built from a Dockerfile and code. */
  readonly images: Images;
  /** Persistent volumes, attached at a microVM's create. */
  readonly volumes: Volumes;
  /** API keys (admin key only). */
  readonly keys: Keys;
  /** Tenants (admin key only). */
  readonly tenants: Tenants;
  private readonly http: Transport;

  constructor(opts: CocoonClientOpts = {}) {
    const env = typeof process === "undefined" ? {} : process.env;
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    if (!Number.isFinite(timeoutMs) || timeoutMs < 0) throw new RangeError(`timeoutMs must be a number of milliseconds >= 0, got ${timeoutMs}`);
    this.http = new Transport({
      baseUrl: opts.baseUrl ?? env.COCOON_URL ?? "http://127.0.0.1:7070",
      apiKey: opts.apiKey ?? env.COCOON_API_KEY,
      timeoutMs,
      fetch: opts.fetch ?? globalThis.fetch.bind(globalThis),
    });
    this.microvms = new MicroVms(this.http);
    this.images = new Images(this.http);
    this.volumes = new Volumes(this.http);
    this.keys = new Keys(this.http);
    this.tenants = new Tenants(this.http);
  }

  /** The server's base URL as configured. */
  get baseUrl(): string {
    return this.http.config.baseUrl;
  }

  /** `GET /v1/health` (no key needed): status, accelerator (`kvm` or `tcg`) and version. */
  health(call?: CallOpts): Promise<Health> {
    return this.http.json<Health>({ method: "GET", path: "/v1/health" }, call);
  }
}
