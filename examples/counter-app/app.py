"""A tiny web app whose state lives only in memory: GET / counts requests."""
import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

count = 0


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        global count
        if self.path == "/health":
            body = b"ok\n"
        else:
            count += 1
            body = json.dumps({
                "count": count,
                "greeting": os.environ.get("GREETING", ""),
                "hostname": socket.gethostname(),
                "user": os.getuid(),
            }).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    print(f"listening on :{port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
