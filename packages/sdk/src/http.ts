import { CocoonError, ConnectionError, TimeoutError, errorFromResponse } from "./errors.ts";

/** Options every SDK call takes. */
export interface CallOpts {
  /** Cancels the call; it then rejects with `signal.reason`. */
  signal?: AbortSignal;
  /**
   * Gives up after this many milliseconds with a {@link TimeoutError}; `0` waits
   * forever. For streaming calls it bounds the wait for the response to start,
   * not the stream itself.
   * @default the client's `timeoutMs`
   */
  timeoutMs?: number;
}

export type Query = Record<string, string | number | boolean | undefined>;

export interface RequestSpec {
  method: "GET" | "POST" | "PUT" | "DELETE";
  path: string;
  query?: Query;
  /** Sent as `application/json`. */
  json?: unknown;
  /** Sent as is (bytes, a stream, FormData); `contentType` names it unless FormData sets its own. */
  body?: BodyInit;
  contentType?: string;
  accept?: string;
}

export interface TransportConfig {
  baseUrl: string;
  apiKey: string | undefined;
  timeoutMs: number;
  fetch: typeof fetch;
}

/** An open response whose body is still to be read; `release` ends the timer and the link to the caller's signal. */
interface Open {
  res: Response;
  requestId: string;
  release(): void;
  /** Maps a failure while reading the body the same way as one while sending: `throw open.fail(err)`. */
  fail(err: unknown): unknown;
}

/**
 * The one place requests are made: base URL, auth, request ids, timeouts,
 * cancellation and error mapping. Every failure leaves here as a CocoonError,
 * except cancellation by the caller's signal (its reason is rethrown).
 */
export class Transport {
  constructor(readonly config: TransportConfig) {}

  url(path: string, query?: Query): string {
    const url = new URL(this.config.baseUrl.replace(/\/+$/, "") + path);
    for (const [k, v] of Object.entries(query ?? {})) if (v !== undefined) url.searchParams.set(k, String(v));
    return url.toString();
  }

  /** Sends and returns the parsed JSON answer. */
  async json<T>(spec: RequestSpec, opts: CallOpts = {}): Promise<T> {
    const open = await this.open(spec, opts);
    try {
      const text = await open.res.text();
      return (text ? JSON.parse(text) : undefined) as T;
    } catch (err) {
      throw open.fail(err);
    } finally {
      open.release();
    }
  }

  /** Sends and returns the whole answer as bytes, with its content type. */
  async bytes(spec: RequestSpec, opts: CallOpts = {}): Promise<{ data: Uint8Array; contentType: string }> {
    const open = await this.open(spec, opts);
    try {
      const data = new Uint8Array(await open.res.arrayBuffer());
      return { data, contentType: open.res.headers.get("content-type") ?? "" };
    } catch (err) {
      throw open.fail(err);
    } finally {
      open.release();
    }
  }

  /**
   * Sends and returns the response once its headers arrived; `timeoutMs` stops
   * counting then. The body stays cancellable through `signal` and is released
   * when fully read or cancelled.
   */
  async stream(spec: RequestSpec, opts: CallOpts = {}): Promise<{ res: Response; body: ReadableStream<Uint8Array> }> {
    const open = await this.open(spec, opts, { headersOnly: true });
    const source = open.res.body;
    if (!source) {
      open.release();
      return { res: open.res, body: new ReadableStream({ start: (c) => c.close() }) };
    }
    const reader = source.getReader();
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        try {
          const { done, value } = await reader.read();
          if (done) {
            open.release();
            controller.close();
          } else controller.enqueue(value);
        } catch (err) {
          open.release();
          controller.error(open.fail(err));
        }
      },
      async cancel(reason) {
        open.release();
        await reader.cancel(reason);
      },
    });
    return { res: open.res, body };
  }

  private async open(spec: RequestSpec, opts: CallOpts, mode: { headersOnly?: boolean } = {}): Promise<Open> {
    const signal = opts.signal;
    signal?.throwIfAborted();
    const timeoutMs = opts.timeoutMs ?? this.config.timeoutMs;
    const requestId = globalThis.crypto.randomUUID();
    const controller = new AbortController();
    let timedOut = false;
    const onAbort = () => controller.abort(signal?.reason);
    signal?.addEventListener("abort", onAbort, { once: true });
    let timer: ReturnType<typeof setTimeout> | undefined =
      timeoutMs > 0
        ? setTimeout(() => {
            timedOut = true;
            controller.abort();
          }, timeoutMs)
        : undefined;
    const stopTimer = () => {
      clearTimeout(timer);
      timer = undefined;
    };
    const release = () => {
      stopTimer();
      signal?.removeEventListener("abort", onAbort);
    };
    const fail = (err: unknown): unknown => {
      if (err instanceof CocoonError) return err;
      if (signal?.aborted) return signal.reason;
      if (timedOut) return new TimeoutError({ code: "Timeout", status: 0, message: `${spec.method} ${spec.path} did not complete within ${timeoutMs} ms`, requestId, cause: err });
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      const why = cause?.code ?? cause?.message ?? (err as Error).message;
      return new ConnectionError({ code: "Connection", status: 0, message: `cannot reach Cocoon at ${this.config.baseUrl}: ${why}`, requestId, cause: err });
    };

    const headers: Record<string, string> = { "x-request-id": requestId };
    if (this.config.apiKey) headers.authorization = `Bearer ${this.config.apiKey}`;
    if (spec.accept) headers.accept = spec.accept;
    let body: BodyInit | undefined = spec.body;
    if (spec.json !== undefined) {
      body = JSON.stringify(spec.json);
      headers["content-type"] = "application/json";
    } else if (spec.contentType) headers["content-type"] = spec.contentType;

    let res: Response;
    try {
      res = await this.config.fetch(this.url(spec.path, spec.query), {
        method: spec.method,
        headers,
        body,
        signal: controller.signal,
        // Required by fetch for a streamed request body; harmless otherwise.
        ...(body instanceof ReadableStream ? { duplex: "half" } : {}),
      } as RequestInit);
    } catch (err) {
      release();
      throw fail(err);
    }
    if (!res.ok) {
      try {
        const text = await res.text();
        throw errorFromResponse(res.status, text, requestId);
      } catch (err) {
        throw fail(err);
      } finally {
        release();
      }
    }
    if (mode.headersOnly) stopTimer();
    return { res, requestId, release, fail };
  }
}

/** Splits a byte stream into lines of text (UTF-8), without the newline. */
export async function* lines(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  const reader = body.getReader();
  let buffered = "";
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let newline: number;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        if (line.trim()) yield line;
      }
    }
    buffered += decoder.decode();
    if (buffered.trim()) yield buffered;
  } finally {
    // The consumer stopped early (break, throw): stop the download too.
    await reader.cancel().catch(() => undefined);
  }
}

/** Turns a byte stream into an async iterable of text chunks (UTF-8, split safely across chunk borders). */
export async function* textChunks(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  const reader = body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      const text = decoder.decode(value, { stream: true });
      if (text) yield text;
    }
    const rest = decoder.decode();
    if (rest) yield rest;
  } finally {
    await reader.cancel().catch(() => undefined);
  }
}
