import { Type } from "@fastify/type-provider-typebox";
import type { Socket } from "node:net";
import type WebSocket from "ws";
import { ApiError } from "../../errors.ts";
import type { MicroVmService } from "../../lifecycle/microvms.ts";
import type { AccessTokens } from "../../router/access-tokens.ts";
import { encodePtyFrame, PTY_FRAME, PtyFrameDecoder, resizeFrame } from "../../vmm/pty-frames.ts";
import type { Api } from "../server.ts";

const TerminalQuery = Type.Object({
  cols: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 80 })),
  rows: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 24 })),
  access_token: Type.Optional(Type.String({ maxLength: 256, description: "API key, for clients that cannot set headers (browsers)" })),
});

/**
 * GET /v1/microvms/{id}/terminal (WebSocket): an interactive shell on a PTY.
 * Binary messages carry keystrokes in and terminal output out; a text message
 * `{"type":"resize","cols":N,"rows":N}` resizes; the server's last message is
 * `{"type":"exit","exitCode":N}`. A SUSPENDED VM is resumed first; input
 * counts as activity.
 */
export function registerTerminalRoute(app: Api, microvms: MicroVmService, shellTokens: AccessTokens): void {
  app.route({
    method: "GET",
    url: "/v1/microvms/:id/terminal",
    config: { permission: "microvm:exec" },
    schema: { params: Type.Object({ id: Type.String({ maxLength: 64 }) }), querystring: TerminalQuery },
    // A plain GET (no upgrade) learns what this route wants, after the usual 404 for a VM it cannot see.
    handler: async (req) => {
      await microvms.get(req.tenantId, req.params.id);
      throw new ApiError("ValidationError", "the terminal is a WebSocket: send Connection: Upgrade, Upgrade: websocket");
    },
    wsHandler: (socket, req) => {
      const { cols = 80, rows = 24 } = req.query as { cols?: number; rows?: number };
      void serveTerminal(socket, microvms, req.tenantId, (req.params as { id: string }).id, { cols, rows });
    },
  });

  // The same terminal opened with a shell auth token (AWS CreateMicrovmShellAuthToken,
  // POST /v1/microvms/{id}/shell-auth-tokens) instead of an API key: in the
  // X-aws-proxy-auth header, or ?token= for browsers, which cannot set headers on a WebSocket.
  app.route({
    method: "GET",
    url: "/v1/microvms/:id/shell",
    schema: {
      params: Type.Object({ id: Type.String({ maxLength: 64 }) }),
      querystring: Type.Object({ cols: TerminalQuery.properties.cols, rows: TerminalQuery.properties.rows, token: Type.Optional(Type.String({ maxLength: 8192 })) }),
    },
    handler: async (req) => {
      await shellTarget(req.params.id, req.headers["x-aws-proxy-auth"], req.query.token);
      throw new ApiError("ValidationError", "the shell is a WebSocket: send Connection: Upgrade, Upgrade: websocket");
    },
    wsHandler: async (socket, req) => {
      const { cols = 80, rows = 24, token } = req.query as { cols?: number; rows?: number; token?: string };
      const id = (req.params as { id: string }).id;
      let tenantId: string;
      try {
        tenantId = await shellTarget(id, req.headers["x-aws-proxy-auth"], token);
      } catch (err) {
        socket.close(1008, (err as Error).message.slice(0, 120));
        return;
      }
      await serveTerminal(socket, microvms, tenantId, id, { cols, rows });
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
 * output out; `{"type":"resize","cols","rows"}` resizes; the last message is
 * `{"type":"exit","exitCode"}`. A SUSPENDED VM is resumed first; input counts
 * as activity.
 */
async function serveTerminal(socket: WebSocket, microvms: MicroVmService, tenantId: string, id: string, size: { cols: number; rows: number }): Promise<void> {
  // Listen at once: messages sent right after the upgrade would otherwise be
  // lost while the VM resumes. They are forwarded once the PTY is open.
  const pending: Buffer[] = [];
  let pty: Socket | undefined;
  socket.on("message", (msg: Buffer, isBinary: boolean) => {
    void microvms.touch(id);
    const frame = toPtyFrame(msg, isBinary);
    if (pty) pty.write(frame);
    else pending.push(frame);
  });
  try {
    const vm = await microvms.runningVm(tenantId, id, "open a terminal in");
    pty = await vm.agent.pty(size);
  } catch (err) {
    socket.send(JSON.stringify({ type: "error", message: (err as Error).message }));
    socket.close(1011, "terminal unavailable");
    return;
  }
  for (const frame of pending.splice(0)) pty.write(frame);
  const decoder = new PtyFrameDecoder();
  pty.on("data", (chunk: Buffer) => {
    for (const frame of decoder.push(chunk)) {
      if (frame.type === PTY_FRAME.data) socket.send(frame.payload);
      else if (frame.type === PTY_FRAME.exit) {
        socket.send(JSON.stringify({ type: "exit", exitCode: frame.payload.readInt32BE(0) }));
        socket.close(1000);
      }
    }
  });
  pty.on("close", () => socket.close(1000));
  pty.on("error", () => socket.close(1011));
  socket.on("close", () => pty?.destroy());
}

/** A client message as an agent frame: binary is keystrokes; text is a JSON control message, or typed text. */
function toPtyFrame(msg: Buffer, isBinary: boolean): Buffer {
  if (!isBinary) {
    try {
      const ctl = JSON.parse(msg.toString()) as { type?: string; cols?: number; rows?: number };
      if (ctl.type === "resize" && ctl.cols && ctl.rows) return resizeFrame(ctl.cols, ctl.rows);
    } catch {
      // not JSON: plain text typed by a simple client
    }
  }
  return encodePtyFrame(PTY_FRAME.data, msg);
}
