"""The I/O-free parts, fed hostile and awkward input directly (no server needed)."""

from __future__ import annotations

import json
import struct

import pytest

import cocoon
from cocoon._http import LineSplitter, parse_head
from cocoon._websocket import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, FrameParser, ProtocolError, TerminalSession, encode_frame
from cocoon.errors import error_from_response


def server_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"") -> bytes:
    """A frame as a server sends it (unmasked unless `mask` is given)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + payload


def test_frames_reassemble_across_reads_fragments_and_lengths() -> None:
    parser = FrameParser()
    big = bytes(range(256)) * 300  # 76800 bytes: a 64-bit length
    stream = (
        server_frame(OP_BINARY, b"x" * 200)  # a 16-bit length
        + server_frame(OP_TEXT, b"hel", fin=False)
        + server_frame(OP_PING, b"p")  # a control frame between fragments
        + server_frame(0, b"lo")
        + server_frame(OP_BINARY, big)
        + server_frame(OP_BINARY, b"masked", mask=b"\x01\x02\x03\x04")
    )
    messages = []
    for i in range(0, len(stream), 7):  # arrives 7 bytes at a time
        messages += parser.feed(stream[i : i + 7])
    assert messages == [(OP_BINARY, b"x" * 200), (OP_PING, b"p"), (OP_TEXT, b"hello"), (OP_BINARY, big), (OP_BINARY, b"masked")]


@pytest.mark.parametrize(
    "frames, why",
    [
        (server_frame(0, b"orphan"), "continuation"),
        (server_frame(OP_TEXT, b"a", fin=False) + server_frame(OP_TEXT, b"b"), "before the previous one ended"),
        (bytes([0x80 | 0x40 | OP_BINARY, 1]) + b"x", "reserved bits"),
        (bytes([0x80 | 0x3, 0]), "unknown opcode"),
        (server_frame(OP_PING, b"p" * 126), "control frame"),
        (struct.pack("!BBQ", 0x80 | OP_BINARY, 127, 1 << 40), "over"),
    ],
)
def test_broken_frames_are_refused(frames: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        FrameParser().feed(frames)


def test_client_frames_are_masked() -> None:
    frame = encode_frame(OP_BINARY, b"abc")
    assert frame[0] == 0x80 | OP_BINARY and frame[1] == 0x80 | 3
    mask, body = frame[2:6], frame[6:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == b"abc"


def test_terminal_session_reads_output_exit_errors_and_answers_pings() -> None:
    session = TerminalSession()
    output, replies = session.receive(server_frame(OP_BINARY, b"$ ") + server_frame(OP_PING, b"hi") + server_frame(OP_TEXT, json.dumps({"type": "exit", "exitCode": 3}).encode()))
    assert output == [b"$ "] and session.exit_code == 3
    assert FrameParser().feed(_unmasked(replies[0])) == [(OP_PONG, b"hi")]
    _, replies = session.receive(server_frame(OP_CLOSE, struct.pack("!H", 1000)))
    assert session.closed and session.failure() is None
    assert FrameParser().feed(_unmasked(replies[0]))[0][0] == OP_CLOSE

    failed = TerminalSession()
    failed.receive(server_frame(OP_TEXT, json.dumps({"type": "error", "message": "microVM vm-1 is TERMINATED"}).encode()))
    failure = failed.failure()
    assert isinstance(failure, cocoon.CocoonError) and failure.message == "microVM vm-1 is TERMINATED"


def _unmasked(frame: bytes) -> bytes:
    """A client frame turned into the server's view (mask bit cleared, payload unmasked); small frames only."""
    n = frame[1] & 0x7F
    mask, body = frame[2:6], frame[6 : 6 + n]
    return bytes([frame[0], n]) + bytes(b ^ mask[i % 4] for i, b in enumerate(body))


def test_lines_split_across_chunks_and_characters() -> None:
    splitter = LineSplitter()
    data = '{"stdout": "é"}\n\n{"exitCode": 0}'.encode()
    lines = []
    for i in range(len(data)):
        lines += splitter.feed(data[i : i + 1])  # one byte at a time, splitting the é
    lines += splitter.end()
    assert lines == ['{"stdout": "é"}', '{"exitCode": 0}']


def test_response_heads_and_error_bodies() -> None:
    status, headers = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nX-A: 1\r\nx-a: 2")
    assert status == 404 and headers == {"content-type": "application/json", "x-a": "1, 2"}
    with pytest.raises(ValueError):
        parse_head(b"SSH-2.0-OpenSSH\r\n")

    assert type(error_from_response(409, b'{"error": {"code": "InvalidState", "message": "m"}}', "r")) is cocoon.InvalidStateError
    assert type(error_from_response(409, b'{"error": {"code": "Conflict", "message": "m"}}', "r")) is cocoon.ConflictError
    unknown = error_from_response(418, b'{"error": {"code": "Teapot", "message": "short and stout"}}', "r")
    assert type(unknown) is cocoon.CocoonError and unknown.code == "Teapot"
    proxy = error_from_response(502, b"<html>bad gateway</html>", None)
    assert type(proxy) is cocoon.InternalError and proxy.message == "HTTP 502: <html>bad gateway</html>"
    assert type(error_from_response(503, b"", None)) is cocoon.CapacityExceededError
