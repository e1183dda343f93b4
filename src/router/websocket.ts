import type { IncomingHttpHeaders } from "node:http";
import WebSocket from "ws";
import { ApiError } from "../errors.ts";

/** A token list as Sec-WebSocket-Protocol carries it (RFC 6455 §4.1, RFC 9110 §5.6.2). */
const PROTOCOLS = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:[ \t]*,[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*$/;

/**
 * The handshake headers a WebSocket upgrade needs (RFC 6455 §4.2.1), checked
 * before the route does anything: a bad one is a 400 in the API's envelope
 * (ws itself would answer in plain text, after the route's work).
 */
export function checkUpgradeHeaders(headers: IncomingHttpHeaders): void {
  const bad = (header: string, rule: string) => new ApiError("ValidationError", `WebSocket upgrade: ${header} ${rule}`, { field: `headers.${header}` });
  if (headers.upgrade?.toLowerCase() !== "websocket") throw bad("upgrade", "must be websocket");
  if (!/^[+/0-9A-Za-z]{22}==$/.test(headers["sec-websocket-key"] ?? "")) throw bad("sec-websocket-key", "must be 16 bytes in base64");
  if (headers["sec-websocket-version"] !== "13" && headers["sec-websocket-version"] !== "8") throw bad("sec-websocket-version", "must be 13");
  const protocols = headers["sec-websocket-protocol"];
  if (protocols !== undefined && !PROTOCOLS.test(protocols)) throw bad("sec-websocket-protocol", "must be a comma-separated list of tokens");
}

/** A close frame's reason holds at most 123 bytes (RFC 6455 §5.5: 125-byte control payload, 2 for the code). */
export const MAX_CLOSE_REASON_BYTES = 123;

/**
 * A close code this side may send for `code` received or meant (RFC 6455
 * §7.4): 1005 (no code) is a normal close; 1006 (the peer vanished: the app
 * dropped the socket, or its VM was suspended or ended) is "going away", so
 * clients reconnect; 1015 (TLS) and any code that may not be sent is 1011.
 */
export function sendableCloseCode(code: number): number {
  if (code === 1005) return 1000;
  if (code === 1006) return 1001;
  const registered = code >= 1000 && code <= 1014 && code !== 1004 && code !== 1005 && code !== 1006;
  const application = code >= 3000 && code <= 4999;
  return Number.isInteger(code) && (registered || application) ? code : 1011;
}

/** `text` cut to MAX_CLOSE_REASON_BYTES of UTF-8, on a character boundary. */
export function closeReason(text: string): string {
  const bytes = Buffer.from(text);
  if (bytes.length <= MAX_CLOSE_REASON_BYTES) return text;
  let end = MAX_CLOSE_REASON_BYTES;
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--; // a continuation byte: back to its character's start
  return bytes.subarray(0, end).toString();
}

/** Closes `ws` with a code and reason that can always be sent, whatever a peer or an error said. */
export function closeWebSocket(ws: WebSocket, code: number, reason = ""): void {
  if (ws.readyState === WebSocket.CLOSING || ws.readyState === WebSocket.CLOSED) return;
  if (ws.readyState === WebSocket.CONNECTING) return void ws.terminate();
  // A paused socket would never read the peer's answering close frame.
  if (ws.isPaused) ws.resume();
  ws.close(sendableCloseCode(code), closeReason(reason));
}

/**
 * Sends to `ws` with back-pressure on its source: once more than `highBytes`
 * are queued and not yet written out, `pause` is called, and `resume` once
 * the queue is back under half of it. What a peer (a guest's app, a
 * terminal's output) sends faster than the receiver reads stays with the
 * peer instead of in the server's memory.
 */
export class BoundedSender {
  private queuedBytes = 0;
  private paused = false;

  constructor(
    private readonly ws: WebSocket,
    private readonly source: { pause(): void; resume(): void },
    private readonly highBytes = 1024 * 1024,
  ) {}

  send(data: Buffer | ArrayBuffer | Buffer[] | string, binary: boolean): void {
    if (this.ws.readyState !== WebSocket.OPEN) return;
    const size = typeof data === "string" ? Buffer.byteLength(data) : Array.isArray(data) ? data.reduce((n, b) => n + b.length, 0) : data.byteLength;
    this.queuedBytes += size;
    this.ws.send(data, { binary }, () => {
      this.queuedBytes -= size;
      if (this.paused && this.queuedBytes <= this.highBytes / 2) {
        this.paused = false;
        this.source.resume();
      }
    });
    if (!this.paused && this.queuedBytes > this.highBytes) {
      this.paused = true;
      this.source.pause();
    }
  }
}
