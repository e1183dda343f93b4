import { FitAddon } from "@xterm/addon-fit";
import { Terminal as XTerm } from "@xterm/xterm";
import { useEffect, useRef, useState } from "react";
import { api } from "../api.ts";

/**
 * xterm.js over GET /v1/microvms/{id}/terminal (WebSocket, opened with a
 * one-time ticket so the API key stays out of URLs): binary frames are
 * keystrokes and output, text frames JSON ({type:"resize"} out; {type:"exit"}
 * or {type:"error"} in). A suspended VM is resumed by the server.
 */
export function Terminal({ id }: { id: string }) {
  const box = useRef<HTMLDivElement>(null);
  const reconnect = useRef<HTMLButtonElement>(null);
  const [status, setStatus] = useState("connecting…");
  const [generation, setGeneration] = useState(0);
  useEffect(() => {
    const el = box.current;
    if (!el) return;
    const term = new XTerm({ cursorBlink: true, fontSize: 14, scrollback: 5000, fontFamily: "ui-monospace, Menlo, Consolas, monospace" });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(el);
    try {
      fit.fit();
    } catch {
      // not laid out yet
    }
    const encoder = new TextEncoder();
    const abort = new AbortController();
    let ws: WebSocket | undefined;
    setStatus("connecting… (a suspended microVM is resumed first)");
    // A one-time ticket first (POST with the key), then the WebSocket with the ticket.
    api.terminalUrl(id, term.cols, term.rows, abort.signal).then(
      (url) => {
        if (abort.signal.aborted) return;
        const socket = new WebSocket(url);
        ws = socket;
        socket.binaryType = "arraybuffer";
        socket.onopen = () => {
          setStatus("connected");
          term.focus();
        };
        socket.onmessage = (ev: MessageEvent<ArrayBuffer | string>) => {
          if (typeof ev.data !== "string") {
            term.write(new Uint8Array(ev.data));
            return;
          }
          try {
            const msg = JSON.parse(ev.data) as { type?: string; exitCode?: number; message?: string };
            if (msg.type === "exit") setStatus(`shell exited with status ${msg.exitCode}`);
            else if (msg.type === "error") setStatus(`error: ${msg.message}`);
          } catch {
            term.write(ev.data);
          }
        };
        socket.onclose = () => setStatus((s) => (s === "connected" || s.startsWith("connecting") ? "disconnected" : s));
      },
      (err: Error) => {
        if (!abort.signal.aborted) setStatus(`error: ${err.message}`);
      },
    );
    // Tab belongs to the shell; Ctrl+] leaves the terminal for keyboard users (as in telnet).
    term.attachCustomKeyEventHandler((e) => {
      if (e.type === "keydown" && e.ctrlKey && e.key === "]") {
        term.blur();
        reconnect.current?.focus();
        return false;
      }
      return true;
    });
    const input = term.onData((d) => ws?.readyState === WebSocket.OPEN && ws.send(encoder.encode(d)));
    const resize = term.onResize(({ cols, rows }) => ws?.readyState === WebSocket.OPEN && ws.send(JSON.stringify({ type: "resize", cols, rows })));
    const observer = new ResizeObserver(() => {
      try {
        fit.fit();
      } catch {
        // detached
      }
    });
    observer.observe(el);
    return () => {
      observer.disconnect();
      input.dispose();
      resize.dispose();
      abort.abort();
      ws?.close();
      term.dispose();
    };
  }, [id, generation]);
  return (
    <div className="card">
      <div className="row spread">
        <h2>Terminal</h2>
        <span className="row">
          <span className="hint" role="status" data-terminal-status={status}>
            {status}
          </span>
          <button ref={reconnect} type="button" className="small" onClick={() => setGeneration((g) => g + 1)}>
            Reconnect
          </button>
        </span>
      </div>
      <div ref={box} className="terminal" aria-label="Terminal" aria-describedby="terminalHelp" />
      <p id="terminalHelp" className="hint">
        Ctrl+] moves the keyboard focus out of the terminal.
      </p>
    </div>
  );
}
