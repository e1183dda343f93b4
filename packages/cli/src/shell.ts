import WebSocket from "ws";
import { CliError } from "./common.ts";

/**
 * `GET /v1/microvms/{id}/terminal` as a WebSocket (docs/api.md), with the route's
 * framing: binary messages carry keystrokes in and terminal output out; a
 * text message `{"type":"resize","cols","rows"}` resizes the PTY; the server
 * ends with `{"type":"exit","exitCode":N}`, or `{"type":"error","message"}`.
 * Resolves to the shell's exit status.
 *
 * On a terminal, stdin is switched to raw mode (every key, Ctrl-C included,
 * goes to the VM) and restored on the way out. From a pipe, the input is sent
 * as it comes and the shell's own exit ends the session.
 */
export async function openShell(baseUrl: string, microVmId: string, apiKey: string | undefined): Promise<number> {
  const url = new URL(`${baseUrl.replace(/\/+$/, "")}/v1/microvms/${encodeURIComponent(microVmId)}/terminal`);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const { stdin, stdout } = process;
  if (stdout.isTTY) {
    url.searchParams.set("cols", String(stdout.columns));
    url.searchParams.set("rows", String(stdout.rows));
  }
  const socket = new WebSocket(url, { headers: apiKey ? { authorization: `Bearer ${apiKey}` } : {} });
  const raw = stdin.isTTY === true;

  return new Promise<number>((resolve, reject) => {
    let exitCode: number | undefined;
    let failure: string | undefined;
    const onInput = (chunk: Buffer) => socket.send(chunk, { binary: true });
    const onResize = () => socket.send(JSON.stringify({ type: "resize", cols: stdout.columns, rows: stdout.rows }));
    const cleanup = () => {
      stdin.off("data", onInput);
      stdout.off("resize", onResize);
      if (raw) stdin.setRawMode(false);
      stdin.pause();
    };

    socket.on("unexpected-response", (_req, res) => {
      let body = "";
      res.on("data", (d: Buffer) => (body += d.toString()));
      res.on("end", () => {
        let message = `the terminal answered HTTP ${res.statusCode}`;
        try {
          message = (JSON.parse(body) as { error: { message: string } }).error.message;
        } catch {
          // not an API error body
        }
        reject(new CliError(message));
      });
    });
    socket.on("open", () => {
      if (raw) stdin.setRawMode(true);
      stdin.on("data", onInput);
      stdin.resume();
      if (stdout.isTTY) stdout.on("resize", onResize);
    });
    socket.on("message", (data: Buffer, isBinary: boolean) => {
      if (isBinary) return void stdout.write(data);
      try {
        const msg = JSON.parse(data.toString()) as { type?: string; exitCode?: number; message?: string };
        if (msg.type === "exit") exitCode = msg.exitCode ?? 0;
        else if (msg.type === "error") failure = msg.message ?? "the terminal failed";
      } catch {
        stdout.write(data);
      }
    });
    socket.on("error", (err) => {
      cleanup();
      reject(new CliError(`terminal: ${err.message}`));
    });
    socket.on("close", (code, reason) => {
      cleanup();
      if (failure) reject(new CliError(failure));
      else if (exitCode !== undefined) resolve(exitCode);
      else if (code === 1000) resolve(0);
      else reject(new CliError(`the terminal closed (${code}${reason.length ? ` ${reason.toString()}` : ""})`));
    });
  });
}
