"""The client side of RFC 6455 (WebSocket) without I/O, and the terminal route's
messages on top of it; the sync and async terminals only move the bytes.

Written here rather than taken from Debian's python3-websockets (10.4): that
version has no synchronous client, and its handshake error hides the response
body, so a refused terminal (404, 409) could not become the API's error class.
A client needs only this much of the protocol: the upgrade handshake, masked
frames out, unmasked frames in (fragmented or not), ping, pong and close.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from typing import Dict, List, Optional, Tuple

from ._http import Config, new_request_id, vm_path
from .errors import CocoonError

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""A message from the server larger than this ends the session (the server sends PTY output in small chunks)."""


class ProtocolError(CocoonError):
    """The peer broke RFC 6455 (or the terminal route's framing)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="WebSocketProtocol")


def handshake(config: Config, microvm_id: str, cols: int, rows: int) -> Tuple[bytes, str, str]:
    """The upgrade request for ``GET /v1/microvms/{id}/terminal``, the ``Sec-WebSocket-Accept`` it must be answered with, and its request id."""
    key = base64.b64encode(os.urandom(16)).decode()
    request_id = new_request_id()
    lines = [
        f"GET {config.target(vm_path(microvm_id, '/terminal'), {'cols': cols, 'rows': rows})} HTTP/1.1",
        f"Host: {config.host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        f"x-request-id: {request_id}",
    ]
    if config.api_key:
        lines.append(f"Authorization: Bearer {config.api_key}")
    expected = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), expected, request_id


def check_accept(headers: Dict[str, str], expected: str) -> None:
    if headers.get("upgrade", "").lower() != "websocket" or headers.get("sec-websocket-accept") != expected:
        raise ProtocolError("the server's WebSocket handshake answer is invalid")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final frame, masked as a client must."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + _unmask(payload, mask)


def _unmask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    # XOR with the 4-byte mask repeated, as one big integer operation.
    repeated = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(data), "big")


class FrameParser:
    """Turns received bytes into whole messages ``(opcode, payload)``; control frames come as they arrive, between fragments too."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fragments: Optional[Tuple[int, bytearray]] = None

    def feed(self, data: bytes) -> List[Tuple[int, bytes]]:
        self._buffer += data
        messages: List[Tuple[int, bytes]] = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return messages
            fin, opcode, payload = frame
            if opcode >= OP_CLOSE:
                if not fin or len(payload) > 125:
                    raise ProtocolError("a fragmented or oversized control frame")
                messages.append((opcode, payload))
            elif opcode == OP_CONTINUATION:
                if self._fragments is None:
                    raise ProtocolError("a continuation frame without a message to continue")
                self._fragments[1].extend(payload)
                if len(self._fragments[1]) > MAX_MESSAGE_BYTES:
                    raise ProtocolError(f"a message over {MAX_MESSAGE_BYTES} bytes")
                if fin:
                    messages.append((self._fragments[0], bytes(self._fragments[1])))
                    self._fragments = None
            elif opcode in (OP_TEXT, OP_BINARY):
                if self._fragments is not None:
                    raise ProtocolError("a new message before the previous one ended")
                if fin:
                    messages.append((opcode, payload))
                else:
                    self._fragments = (opcode, bytearray(payload))
            else:
                raise ProtocolError(f"unknown opcode {opcode}")

    def _next_frame(self) -> Optional[Tuple[bool, int, bytes]]:
        buf = self._buffer
        if len(buf) < 2:
            return None
        fin, opcode, masked, n = bool(buf[0] & 0x80), buf[0] & 0x0F, bool(buf[1] & 0x80), buf[1] & 0x7F
        if buf[0] & 0x70:
            raise ProtocolError("reserved bits set (no extension was negotiated)")
        at = 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, at = struct.unpack_from("!H", buf, 2)[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, at = struct.unpack_from("!Q", buf, 2)[0], 10
        if n > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"a frame over {MAX_MESSAGE_BYTES} bytes")
        mask = b""
        if masked:  # servers must not mask; accepted all the same
            if len(buf) < at + 4:
                return None
            mask, at = bytes(buf[at : at + 4]), at + 4
        if len(buf) < at + n:
            return None
        payload = bytes(buf[at : at + n])
        del buf[: at + n]
        return fin, opcode, _unmask(payload, mask) if masked else payload


class TerminalSession:
    """The terminal route's messages (docs/api.md, src/api/routes/terminal.ts): binary
    frames carry PTY output; text frames carry ``{"type": "exit", "exitCode"}`` or
    ``{"type": "error", "message"}``. Feeding received bytes returns the output
    and the frames to send back (pong, the close reply)."""

    def __init__(self) -> None:
        self._parser = FrameParser()
        self.exit_code: Optional[int] = None
        self.error: Optional[str] = None
        self.closed = False
        self.close_sent = False

    def receive(self, data: bytes) -> Tuple[List[bytes], List[bytes]]:
        output: List[bytes] = []
        replies: List[bytes] = []
        for opcode, payload in self._parser.feed(data):
            if opcode == OP_BINARY:
                output.append(payload)
            elif opcode == OP_TEXT:
                self._control(payload, output)
            elif opcode == OP_PING:
                replies.append(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self.closed = True
                if not self.close_sent:
                    replies.append(self.close_frame())
        return output, replies

    def _control(self, payload: bytes, output: List[bytes]) -> None:
        try:
            msg = json.loads(payload)
        except ValueError:
            msg = None
        if isinstance(msg, dict) and msg.get("type") == "exit":
            self.exit_code = int(msg.get("exitCode") or 0)
        elif isinstance(msg, dict) and msg.get("type") == "error":
            self.error = str(msg.get("message") or "the terminal failed")
        else:
            output.append(payload)  # text that is no control message is output

    def close_frame(self) -> bytes:
        self.close_sent = True
        return encode_frame(OP_CLOSE, struct.pack("!H", 1000))

    def failure(self) -> Optional[CocoonError]:
        """The error to raise once the session ended, if it ended in one."""
        if self.error is not None:
            return CocoonError(self.error, code="TerminalError")
        return None


def input_frame(data: "bytes | str") -> bytes:
    """Keystrokes (a binary frame)."""
    return encode_frame(OP_BINARY, data.encode() if isinstance(data, str) else bytes(data))


def resize_frame(cols: int, rows: int) -> bytes:
    return encode_frame(OP_TEXT, json.dumps({"type": "resize", "cols": cols, "rows": rows}).encode())
