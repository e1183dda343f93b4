import { ApiError, checkIntRange } from "../errors.ts";
import { sleep } from "../util/process.ts";
import type { AgentClient, HookAnswer } from "../vmm/agent-client.ts";
import { AGENT_PORT } from "../vmm/qemu.ts";

/**
 * Lifecycle hooks (AWS Lambda MicroVMs' hooks, on both APIs): an image names
 * the guest port its hook listener serves, and Cocoon POSTs to it:
 * - build: `/ready` until it answers 2xx (then it is the readiness check),
 *   `/validate` once before the snapshot (non-2xx fails the build);
 * - each VM: `/run` (body: the launch's runHookPayload) after launch,
 *   `/suspend` before a suspend, `/resume` after a resume, `/terminate`
 *   before a terminate (of a running VM).
 * A VM hook that fails or times out is an event on the VM; the operation goes on.
 * Calls go through the agent (`POST /hook`), so the port needs no forwarding.
 */
export const HOOK_NAMES = ["ready", "validate", "run", "suspend", "resume", "terminate"] as const;
export type HookName = (typeof HOOK_NAMES)[number];

export interface ImageHooks {
  port: number;
  /** The enabled hooks and their timeouts (seconds); an absent hook is not called. */
  hooks: Partial<Record<HookName, { timeoutSeconds: number }>>;
}

/** How a caller declares hooks: the port, which hooks are on (default: all), their timeouts. */
export interface HooksRequest {
  port: number;
  enabled?: HookName[];
  timeoutSeconds?: Partial<Record<HookName, number>>;
}

export const HOOK_LIMITS = { timeoutSeconds: { min: 1, max: 60 }, port: { min: 1, max: 65_535 }, runPayloadBytes: 16 * 1024 } as const;
/** `/ready` is polled for up to its timeout (the app may take a while to start); the others are single calls. */
const DEFAULT_TIMEOUT_SECONDS: Record<HookName, number> = { ready: 60, validate: 10, run: 10, suspend: 10, resume: 10, terminate: 10 };

/** Validates a hooks declaration (400 naming the field) into the stored form. */
export function normalizeHooks(req: HooksRequest): ImageHooks {
  checkIntRange("hooks.port", req.port, HOOK_LIMITS.port);
  if (req.port === AGENT_PORT) throw new ApiError("ValidationError", `hooks.port ${AGENT_PORT} is the Cocoon agent's own port`, { field: "hooks.port" });
  const enabled = req.enabled ?? [...HOOK_NAMES];
  const hooks: ImageHooks["hooks"] = {};
  for (const name of enabled) {
    if (!HOOK_NAMES.includes(name)) throw new ApiError("ValidationError", `hooks: unknown hook ${String(name)} (${HOOK_NAMES.join(", ")})`, { field: "hooks.enabled" });
    hooks[name] = { timeoutSeconds: DEFAULT_TIMEOUT_SECONDS[name] };
  }
  for (const [name, seconds] of Object.entries(req.timeoutSeconds ?? {})) {
    if (!HOOK_NAMES.includes(name as HookName)) throw new ApiError("ValidationError", `hooks.timeoutSeconds: unknown hook ${name}`, { field: "hooks.timeoutSeconds" });
    checkIntRange(`hooks.timeoutSeconds.${name}`, seconds!, HOOK_LIMITS.timeoutSeconds);
    if (hooks[name as HookName]) hooks[name as HookName] = { timeoutSeconds: seconds! };
  }
  return { port: req.port, hooks };
}

/** A hook's outcome as one line for an event or the build log. */
function describeHook(name: HookName, answer: HookAnswer): { ok: boolean; message: string } {
  const call = `POST /${name}`;
  if (answer.status === undefined) {
    return { ok: false, message: `${call} ${answer.timedOut ? `timed out after ${answer.durationMs} ms` : `failed: ${answer.error ?? "no answer"}`}` };
  }
  const ok = answer.status >= 200 && answer.status < 300;
  const body = !ok && answer.body?.length ? `: ${answer.body.toString("utf8").slice(0, 200).trim()}` : "";
  return { ok, message: `${call} answered ${answer.status} in ${answer.durationMs} ms${body}` };
}

/** Calls one VM hook if the image enables it; undefined when it does not. Never throws for the app's failure. */
export async function callHook(agent: AgentClient, hooks: ImageHooks | undefined, name: HookName, body?: Buffer): Promise<{ ok: boolean; message: string } | undefined> {
  const hook = hooks?.hooks[name];
  if (!hooks || !hook) return undefined;
  try {
    const answer = await agent.hook({ port: hooks.port, path: `/${name}`, body, contentType: body ? contentTypeOf(body) : undefined, timeoutMs: hook.timeoutSeconds * 1000 });
    return describeHook(name, answer);
  } catch (err) {
    return { ok: false, message: `POST /${name}: the agent did not answer: ${(err as Error).message}` };
  }
}

/** JSON when the payload parses as JSON, else plain bytes. */
function contentTypeOf(body: Buffer): string {
  try {
    JSON.parse(body.toString("utf8"));
    return "application/json";
  } catch {
    return "application/octet-stream";
  }
}

/**
 * Build side: polls `POST /ready` until it answers 2xx, for at most the
 * hook's timeout; the last failure is the reason when it never does.
 */
export async function waitReadyHook(agent: AgentClient, hooks: ImageHooks, signal: AbortSignal): Promise<string> {
  const timeoutMs = hooks.hooks.ready!.timeoutSeconds * 1000;
  const deadline = Date.now() + timeoutMs;
  let last = "no answer yet";
  for (;;) {
    signal.throwIfAborted();
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`the ready hook never answered 2xx within ${timeoutMs / 1000} s: ${last}`);
    const outcome = describeHook("ready", await agent.hook({ port: hooks.port, path: "/ready", timeoutMs: Math.max(1, Math.min(left, 10_000)) }));
    if (outcome.ok) return outcome.message;
    last = outcome.message;
    await sleep(250);
  }
}

/** Build side: one `POST /validate`; throws its reason unless it answers 2xx. */
export async function validateHook(agent: AgentClient, hooks: ImageHooks): Promise<string> {
  const outcome = describeHook("validate", await agent.hook({ port: hooks.port, path: "/validate", timeoutMs: hooks.hooks.validate!.timeoutSeconds * 1000 }));
  if (!outcome.ok) throw new Error(`the validate hook failed: ${outcome.message}`);
  return outcome.message;
}
