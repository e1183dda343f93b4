// The console talks to the public v1 API only (docs/api.md), on the
// server it was loaded from, with the API key kept in sessionStorage.

import type { ApiErrorCode, ErrorEnvelope, Health, ImageInfo, MicroVmEvent, MicroVmInfo, MicroVmPage, MicroVmState, VolumeInfo } from "@cocoon/sdk";
import { microVmStateValues } from "@cocoon/sdk/api";

const KEY = "cocoon.apiKey";

export const session = {
  get: (): string => sessionStorage.getItem(KEY) ?? "",
  set: (key: string) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

// The API's shapes are generated from its OpenAPI document (the SDK's api.gen.ts, npm run gen:api):
// types, and the states as a value from @cocoon/sdk/api alone (nothing else of the SDK is bundled).
export type VmState = MicroVmState;
export const VM_STATES: readonly VmState[] = microVmStateValues;
export type Vm = MicroVmInfo;
export type VmEvent = MicroVmEvent;
export type Metrics = import("@cocoon/sdk/api").components["schemas"]["VmMetrics"];
export type Image = ImageInfo;
export type Volume = VolumeInfo;

/** An error answer of the API (ErrorEnvelope), or the console's own `Connection` when the server cannot be reached. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: ApiErrorCode | "Connection" | "Error",
    message: string,
    readonly field?: string,
  ) {
    super(message);
  }
}

async function call<T>(method: string, path: string, opts: { json?: unknown; body?: BodyInit; signal?: AbortSignal; key?: string } = {}): Promise<T> {
  const headers: Record<string, string> = {};
  const key = opts.key ?? session.get();
  if (key) headers.authorization = `Bearer ${key}`;
  let body = opts.body;
  if (opts.json !== undefined) {
    headers["content-type"] = "application/json";
    body = JSON.stringify(opts.json);
  }
  let res: Response;
  try {
    res = await fetch(path, { method, headers, body, signal: opts.signal });
  } catch (err) {
    if (opts.signal?.aborted) throw err;
    throw new ApiError(0, "Connection", `cannot reach the server: ${(err as Error).message}`);
  }
  const text = await res.text();
  const parsed = text ? (safeJson(text) as unknown) : undefined;
  if (!res.ok) {
    // Not every error answer is the server's (a proxy's, say): each field is checked.
    const e = (parsed as Partial<ErrorEnvelope> | undefined)?.error;
    if (res.status === 401 && !opts.key) window.dispatchEvent(new Event("cocoon:unauthorized"));
    const field = e?.details?.field;
    throw new ApiError(res.status, e?.code ?? "Error", e?.message ?? `${method} ${path}: HTTP ${res.status}`, typeof field === "string" ? field : undefined);
  }
  return parsed as T;
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Streams a text response (logs, build log) chunk by chunk until it ends or `signal` aborts. */
export async function stream(path: string, onText: (text: string) => void, signal: AbortSignal): Promise<void> {
  const res = await fetch(path, { headers: { authorization: `Bearer ${session.get()}` }, signal });
  if (!res.ok || !res.body) {
    const e = (safeJson(await res.text()) as Partial<ErrorEnvelope> | undefined)?.error;
    throw new ApiError(res.status, "Error", e?.message ?? `HTTP ${res.status}`);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    onText(decoder.decode(value, { stream: true }));
  }
}

const vmPath = (id: string) => `/v1/microvms/${encodeURIComponent(id)}`;

export const api = {
  health: () => call<Health>("GET", "/v1/health"),
  /** Checks a key before keeping it. */
  check: (key: string) => call<MicroVmPage>("GET", "/v1/microvms?limit=1", { key }),
  /** The newest 1000 VMs (the API lists newest first). */
  listVms: (state?: string) => call<MicroVmPage>("GET", `/v1/microvms?limit=1000${state ? `&state=${encodeURIComponent(state)}` : ""}`),
  getVm: (id: string) => call<Vm>("GET", vmPath(id)),
  createVm: (body: unknown) => call<Vm>("POST", "/v1/microvms", { json: body }),
  suspend: (id: string) => call<Vm>("POST", `${vmPath(id)}/suspend`),
  resume: (id: string) => call<Vm>("POST", `${vmPath(id)}/resume`),
  terminate: (id: string) => call<Vm>("DELETE", vmPath(id)),
  fork: (id: string, count: number) => call<{ microVms: Vm[] }>("POST", `${vmPath(id)}/fork`, { json: { count } }),
  snapshot: (id: string, name: string) => call<Image>("POST", `${vmPath(id)}/snapshots`, { json: { name } }),
  events: (id: string) => call<{ events: VmEvent[] }>("GET", `${vmPath(id)}/events`),
  metrics: (id: string) => call<Metrics>("GET", `${vmPath(id)}/metrics`),
  listImages: () => call<{ images: Image[] }>("GET", "/v1/images"),
  getImage: (id: string) => call<Image>("GET", `/v1/images/${encodeURIComponent(id)}`),
  createImage: (form: FormData) => call<Image>("POST", "/v1/images", { body: form }),
  deleteImage: (id: string, force: boolean) => call<unknown>("DELETE", `/v1/images/${encodeURIComponent(id)}${force ? "?force=true" : ""}`),
  listVolumes: () => call<{ volumes: Volume[] }>("GET", "/v1/volumes"),
  createVolume: (body: { name: string; sizeGiB: number }) => call<Volume>("POST", "/v1/volumes", { json: body }),
  deleteVolume: (idOrName: string) => call<Volume>("DELETE", `/v1/volumes/${encodeURIComponent(idOrName)}`),
  vmLogsPath: (id: string) => `${vmPath(id)}/logs?follow=true`,
  buildLogPath: (id: string) => `/v1/images/${encodeURIComponent(id)}/build-log?follow=true`,
  /** The terminal's WebSocket URL with a one-time ticket (30 s, one use): the API key never goes into a URL. */
  terminalUrl: async (id: string, cols: number, rows: number, signal?: AbortSignal) => {
    const { ticket } = await call<{ ticket: string; expiresAt: string }>("POST", `${vmPath(id)}/terminal/tickets`, { signal });
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    return `${proto}//${location.host}${vmPath(id)}/terminal?cols=${cols}&rows=${rows}&ticket=${encodeURIComponent(ticket)}`;
  },
};
