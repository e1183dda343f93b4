"""Interactive shells: ``GET /v1/microvms/{id}/terminal`` as a WebSocket, sync
(a socket) and async (asyncio streams), over the shared protocol in _websocket."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import AsyncIterator, Dict, Iterator, List, Optional, Tuple, Union

from ._http import MAX_ERROR_BODY_BYTES, Config, parse_head
from ._websocket import TerminalSession, check_accept, handshake, input_frame, resize_frame
from .errors import CocoonError, ConnectionError, TimeoutError, error_from_response

MAX_HEAD_BYTES = 64 * 1024
RECV_BYTES = 64 * 1024


def _split_head(buffer: bytes) -> Optional[Tuple[bytes, bytes]]:
    if b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD_BYTES:
            raise ConnectionError(f"the terminal's response head exceeds {MAX_HEAD_BYTES} bytes", code="Connection")
        return None
    head, rest = buffer.split(b"\r\n\r\n", 1)
    return head, rest


def _error_body_complete(headers: Dict[str, str], body: bytes) -> bool:
    length = headers.get("content-length")
    return (length is not None and len(body) >= int(length)) or len(body) >= MAX_ERROR_BODY_BYTES


class Terminal:
    """An interactive shell on a PTY in a microVM (sync). ``send`` types, ``recv``
    reads output; when the shell exits, ``recv`` returns ``b""`` and ``exit_code``
    is set. Use it as a context manager, or call ``close``."""

    def __init__(self, sock: socket.socket, session: TerminalSession, pending: bytes) -> None:
        self._sock = sock
        self._session = session
        self._output: List[bytes] = []
        self._absorb(pending)

    @classmethod
    def open(cls, config: Config, microvm_id: str, cols: int, rows: int, timeout: Optional[float]) -> "Terminal":
        request, expected, request_id = handshake(config, microvm_id, cols, rows)
        sock: Optional[socket.socket] = None
        try:
            sock = socket.create_connection((config.host, config.port), timeout)
            if config.tls:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=config.host)
            sock.sendall(request)
            buffer = b""
            split = None
            while split is None:
                data = sock.recv(RECV_BYTES)
                if not data:
                    raise ConnectionError("the server closed the connection during the terminal handshake", code="Connection", request_id=request_id)
                buffer += data
                split = _split_head(buffer)
            status, headers = parse_head(split[0])
            if status != 101:
                body = split[1]
                while not _error_body_complete(headers, body):
                    data = sock.recv(RECV_BYTES)
                    if not data:
                        break
                    body += data
                raise error_from_response(status, body, request_id)
            check_accept(headers, expected)
        except BaseException as err:
            if sock is not None:
                sock.close()
            if isinstance(err, socket.timeout) and not isinstance(err, CocoonError):
                raise TimeoutError(f"the terminal of {microvm_id} did not open within {timeout} s", code="Timeout", request_id=request_id) from err
            if isinstance(err, (OSError, ValueError)) and not isinstance(err, CocoonError):
                raise ConnectionError(f"cannot reach Cocoon at {config.base_url}: {err}", code="Connection", request_id=request_id) from err
            raise
        sock.settimeout(None)
        return cls(sock, TerminalSession(), split[1])

    @property
    def exit_code(self) -> Optional[int]:
        """The shell's exit status, once it exited."""
        return self._session.exit_code

    def send(self, data: Union[bytes, str]) -> None:
        """Types ``data`` (text is sent as UTF-8; ``"\\x03"`` is Ctrl-C)."""
        self._sock.sendall(input_frame(data))

    def resize(self, cols: int, rows: int) -> None:
        self._sock.sendall(resize_frame(cols, rows))

    def recv(self, timeout: Optional[float] = None) -> bytes:
        """The next output, waiting up to ``timeout`` seconds (None: until some
        arrives); ``b""`` once the session ended. Raises TimeoutError when nothing
        arrived in time, and CocoonError if the server ended the session with an error."""
        while not self._output:
            if self._session.closed:
                failure = self._session.failure()
                if failure:
                    raise failure
                return b""
            self._sock.settimeout(timeout)
            try:
                data = self._sock.recv(RECV_BYTES)
            except socket.timeout as err:
                raise TimeoutError(f"no terminal output within {timeout} s", code="Timeout") from err
            if not data:
                self._session.closed = True
            self._absorb(data)
        return self._output.pop(0)

    def __iter__(self) -> Iterator[bytes]:
        """The output until the session ends."""
        while True:
            chunk = self.recv()
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        """Ends the session (the shell is killed) and closes the connection."""
        try:
            if not self._session.close_sent:
                self._sock.sendall(self._session.close_frame())
        except OSError:
            pass  # already gone
        self._sock.close()

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _absorb(self, data: bytes) -> None:
        output, replies = self._session.receive(data)
        self._output.extend(output)
        for reply in replies:
            try:
                self._sock.sendall(reply)
            except OSError:
                self._session.closed = True


class AsyncTerminal:
    """An interactive shell on a PTY in a microVM (async); see :class:`Terminal`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: TerminalSession, pending: bytes) -> None:
        self._reader = reader
        self._writer = writer
        self._session = session
        self._output: List[bytes] = []
        self._absorb(pending)

    @classmethod
    async def open(cls, config: Config, microvm_id: str, cols: int, rows: int, timeout: Optional[float]) -> "AsyncTerminal":
        request, expected, request_id = handshake(config, microvm_id, cols, rows)

        async def connect() -> "AsyncTerminal":
            reader, writer = await asyncio.open_connection(config.host, config.port, ssl=ssl.create_default_context() if config.tls else None)
            try:
                writer.write(request)
                await writer.drain()
                buffer = b""
                split = None
                while split is None:
                    data = await reader.read(RECV_BYTES)
                    if not data:
                        raise ConnectionError("the server closed the connection during the terminal handshake", code="Connection", request_id=request_id)
                    buffer += data
                    split = _split_head(buffer)
                status, headers = parse_head(split[0])
                if status != 101:
                    body = split[1]
                    while not _error_body_complete(headers, body):
                        data = await reader.read(RECV_BYTES)
                        if not data:
                            break
                        body += data
                    raise error_from_response(status, body, request_id)
                check_accept(headers, expected)
                return cls(reader, writer, TerminalSession(), split[1])
            except BaseException:
                writer.close()
                raise

        try:
            return await asyncio.wait_for(connect(), timeout)
        except CocoonError:
            raise
        except asyncio.TimeoutError as err:
            raise TimeoutError(f"the terminal of {microvm_id} did not open within {timeout} s", code="Timeout", request_id=request_id) from err
        except (OSError, ValueError) as err:
            raise ConnectionError(f"cannot reach Cocoon at {config.base_url}: {err}", code="Connection", request_id=request_id) from err

    @property
    def exit_code(self) -> Optional[int]:
        return self._session.exit_code

    async def send(self, data: Union[bytes, str]) -> None:
        self._writer.write(input_frame(data))
        await self._writer.drain()

    async def resize(self, cols: int, rows: int) -> None:
        self._writer.write(resize_frame(cols, rows))
        await self._writer.drain()

    async def recv(self) -> bytes:
        """The next output; ``b""`` once the session ended. Bound it with
        ``asyncio.wait_for``; cancelling it leaves the session usable."""
        while not self._output:
            if self._session.closed:
                failure = self._session.failure()
                if failure:
                    raise failure
                return b""
            data = await self._reader.read(RECV_BYTES)
            if not data:
                self._session.closed = True
            self._absorb(data)
        return self._output.pop(0)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.recv()
            if not chunk:
                return
            yield chunk

    async def close(self) -> None:
        if not self._session.close_sent and not self._writer.is_closing():
            self._writer.write(self._session.close_frame())
        self._writer.close()

    async def __aenter__(self) -> "AsyncTerminal":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _absorb(self, data: bytes) -> None:
        output, replies = self._session.receive(data)
        self._output.extend(output)
        for reply in replies:
            if not self._writer.is_closing():
                self._writer.write(reply)
