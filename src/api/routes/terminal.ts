import { Type } from "@fastify/type-provider-typebox";
import type WebSocket from "ws";
import { ApiError } from "../../errors.ts";
import type { GuestService, PtySession } from "../../lifecycle/guest.ts";
import type { MicroVmService } from "../../lifecycle/microvms.ts";
import type { AccessTokens } from "../../router/access-tokens.ts";
import { BoundedSender, closeWebSocket } from "../../router/websocket.ts";
import { ref } from "../schemas.ts";
import type { Api } from "../fastify.ts";
import type { TerminalTickets } from "../tickets.ts";

const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 64 }) });
const TerminalQuery = Type.Object({
  cols: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 80 })),
  rows: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 24 })),
  ticket: Type.Optional(Type.String({ maxLength: 128, description: "a one-time ticket from POST …/terminal/tickets (browsers)" })),
  access_token: Type.Optional(Type.String({ maxLength: 256, description: "API key, for clients that can neither set headers nor get a ticket (deprecated: it ends up in URLs)" })),
});
/** Keystrokes typed while the VM resumes are held up to this much. */
const MAX_PENDING_INPUT_BYTES = 1024 * 1024;

/**
 * GET /v1/microvms/{id}/terminal (WebSocket): an interactive shell on a PTY.
 * Binary messages carry keystrokes in and terminal output out; a text message
 * `{"type":"resize","cols":N,"rows":N}` resizes; the server's last message is
 * `{"type":"exit","exitCode":N}`. A SUSPENDED VM is resumed first; input
 * counts as activity. Browsers authenticate with a one-time ticket
 * (`POST …/terminal/tickets`, then `?ticket=`), not their key in the URL.
 */
export function registerTerminalRoutes(app: Api, deps: { microvms: MicroVmService; guest: GuestService; tickets: TerminalTickets; shellTokens: AccessTokens }): void {
  const { microvms, guest, tickets, shellTokens } = deps;

  app.post("/v1/microvms/:id/terminal/tickets", { config: { permission: "microvm:exec" }, schema: { params: IdParams, response: { 201: ref("TerminalTicket") } } }, async (req, reply) => {
    const row = await microvms.get(req.tenantId, req.params.id);
    return reply.status(201).send(tickets.issue(req.tenantId, row.id));
  });

  app.route({
    method: "GET",
    url: "/v1/microvms/:id/terminal",
    config: { permission: "microvm:exec", ticketed: true, upgrade: true },
    schema: { description: "A WebSocket terminal (PTY) in the VM: binary frames are input and output, text frames control (resize) and the exit.", params: IdParams, querystring: TerminalQuery },
    // The VM is the tenant's before anything happens: another tenant's is a 404 before the upgrade.
    preHandler: async (req) => void (await microvms.get(req.tenantId, req.params.id)),
    // A plain GET (no upgrade) learns what this route wants.
    handler: async () => {
      throw new ApiError("ValidationError", "the terminal is a WebSocket: send Connection: Upgrade, Upgrade: websocket");
    },
    wsHandler: (socket: WebSocket, req) => {
      const { cols = 80, rows = 24 } = req.query as { cols?: number; rows?: number };
      return serveTerminal(socket, guest, req.tenantId, (req.params as { id: string }).id, { cols, rows });
    },
  });

  // The same terminal opened with a shell auth token (AWS CreateMicrovmShellAuthToken,
  // POST /v1/microvms/{id}/shell-auth-tokens) instead of an API key: in the
  // X-aws-proxy-auth header, or ?token= for browsers, which cannot set headers on a WebSocket.
  app.route({
    method: "GET",
    url: "/v1/microvms/:id/shell",
    config: { upgrade: true },
    schema: {
      description: "The terminal's WebSocket opened with a shell auth token (X-aws-proxy-auth, or ?token=) instead of an API key.",
      security: [],
      params: IdParams,
      querystring: Type.Object({ cols: TerminalQuery.properties.cols, rows: TerminalQuery.properties.rows, token: Type.Optional(Type.String({ maxLength: 8192 })) }),
    },
    // Checked before the upgrade: a refusal is an HTTP error.
    preHandler: async (req) => {
      req.tenantId = await shellTarget(req.params.id, req.headers["x-aws-proxy-auth"], req.query.token);
    },
    handler: async () => {
      throw new ApiError("ValidationError", "the shell is a WebSocket: send Connection: Upgrade, Upgrade: websocket");
    },
    wsHandler: (socket: WebSocket, req) => {
      const { cols = 80, rows = 24 } = req.query as { cols?: number; rows?: number };
      return serveTerminal(socket, guest, req.tenantId, (req.params as { id: string }).id, { cols, rows });
    },
  });

  /** The VM's tenant if `token` is a live shell token for it; 401 otherwise (404 for no such VM). */
  async function shellTarget(id: string, header: string | string[] | undefined, query: string | undefined): Promise<string> {
    const token = typeof header === "string" ? header : query;
    const row = await microvms.getAnyTenant(id);
    if (!row || row.state === "TERMINATED") throw new ApiError("NotFound", `microVM ${id} not found`);
    if (!token || !shellTokens.verify(token, id, 0)) throw new ApiError("Unauthorized", `the shell of microVM ${id} needs a live shell auth token (X-aws-proxy-auth or ?token=)`);
    return row.tenant_id;
  }
}

/**
 * One terminal session on a WebSocket: binary messages are keystrokes in and
 * output out (with back-pressure on the shell); `{"type":"resize","cols","rows"}`
 * resizes; the last message is `{"type":"exit","exitCode"}`. A SUSPENDED VM is
 * resumed first; input counts as activity once the terminal is open.
 */
async function serveTerminal(socket: WebSocket, guest: GuestService, tenantId: string, id: string, size: { cols: number; rows: number }): Promise<void> {
  // Listen at once: messages sent right after the upgrade would otherwise be
  // lost while the VM resumes. They are forwarded once the PTY is open.
  const pending: [Buffer, boolean][] = [];
  let pendingBytes = 0;
  let session: PtySession | undefined;
  socket.on("message", (msg: Buffer, isBinary: boolean) => {
    if (session) return toTerminal(session, msg, isBinary);
    pendingBytes += msg.length;
    if (pendingBytes > MAX_PENDING_INPUT_BYTES) return closeWebSocket(socket, 1009, "too much input before the terminal opened");
    pending.push([msg, isBinary]);
  });
  try {
    session = await guest.terminal(tenantId, id, size);
  } catch (err) {
    socket.send(JSON.stringify({ type: "error", message: (err as Error).message }));
    return closeWebSocket(socket, 1011, "terminal unavailable");
  }
  const opened = session;
  socket.on("close", () => opened.close());
  if (socket.readyState !== socket.OPEN) return opened.close();
  for (const [msg, isBinary] of pending.splice(0)) toTerminal(opened, msg, isBinary);
  const output = new BoundedSender(socket, opened);
  opened.on("data", (data: Buffer) => output.send(data, true));
  opened.on("exit", (exitCode: number) => {
    socket.send(JSON.stringify({ type: "exit", exitCode }));
    closeWebSocket(socket, 1000);
  });
  opened.on("end", (err?: Error) => closeWebSocket(socket, err ? 1011 : 1000, err ? `terminal failed: ${err.message}` : ""));
}

/** A client message to the terminal: binary is keystrokes; text is a JSON control message, or typed text. */
function toTerminal(session: PtySession, msg: Buffer, isBinary: boolean): void {
  if (!isBinary) {
    try {
      const ctl = JSON.parse(msg.toString()) as { type?: string; cols?: unknown; rows?: unknown };
      if (ctl.type === "resize") {
        const dim = (v: unknown) => (Number.isInteger(v) && (v as number) >= 1 && (v as number) <= 1000 ? (v as number) : undefined);
        const [cols, rows] = [dim(ctl.cols), dim(ctl.rows)];
        if (cols && rows) session.resize(cols, rows);
        return;
      }
    } catch {
      // not JSON: plain text typed by a simple client
    }
  }
  session.write(msg);
}
