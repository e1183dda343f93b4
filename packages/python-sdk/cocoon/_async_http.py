"""The async client's transport: HTTP/1.1 over asyncio streams, one connection
per call. A deadline bounds each call; cancelling the task that awaits a call
closes its connection (for exec, the server then kills the command)."""

from __future__ import annotations

import asyncio
import json
import ssl
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Dict, Optional, Tuple

from ._http import MAX_ERROR_BODY_BYTES, READ_CHUNK_BYTES, Config, Request, headers_for, new_request_id, parse_head
from .errors import CocoonError, ConnectionError, TimeoutError, error_from_response

MAX_HEAD_BYTES = 64 * 1024
"""A response head (status line and headers) larger than this is refused."""


class _Response:
    """A response whose head was read; ``chunks()`` reads its body (chunked, sized, or up to the connection's end)."""

    def __init__(self, status: int, headers: Dict[str, str], reader: asyncio.StreamReader) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader

    async def chunks(self) -> AsyncIterator[bytes]:
        reader = self._reader
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    return
                data = await reader.readexactly(size)
                await reader.readexactly(2)
                yield data
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left > 0:
                data = await reader.read(min(left, READ_CHUNK_BYTES))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                yield data
        else:
            while True:
                data = await reader.read(READ_CHUNK_BYTES)
                if not data:
                    return
                yield data

    async def read(self, limit: Optional[int] = None) -> bytes:
        out = bytearray()
        async for chunk in self.chunks():
            out += chunk
            if limit is not None and len(out) >= limit:
                break
        return bytes(out)


class AsyncTransport:
    """The one place the async client makes requests: base URL, auth, request ids, timeouts and error mapping."""

    def __init__(self, config: Config) -> None:
        self.config = config

    async def json(self, req: Request, timeout: Optional[float]) -> Any:
        """Sends and returns the parsed JSON answer (None for an empty body)."""
        data, _ = await self.bytes(req, timeout)
        return json.loads(data) if data else None

    async def bytes(self, req: Request, timeout: Optional[float]) -> Tuple[bytes, str]:
        """Sends and returns the whole answer and its content type; ``timeout`` (seconds, None: none) bounds the whole call."""
        request_id = new_request_id()

        async def whole() -> Tuple[bytes, str]:
            async with self._open(req, request_id) as res:
                return await res.read(), res.headers.get("content-type", "")

        with self._mapped(req, timeout, request_id):
            return await asyncio.wait_for(whole(), timeout)

    async def stream(self, req: Request, timeout: Optional[float], check: Optional[Callable[[Dict[str, str]], None]] = None) -> AsyncIterator[bytes]:
        """The answer's body as chunks, as it comes. The request is sent on the
        first iteration; ``timeout`` bounds the wait for the response headers
        only, which ``check`` may refuse by raising. Closing the iterator
        (``aclose()``, or leaving an ``async for`` early) closes the connection."""
        request_id = new_request_id()
        with self._mapped(req, timeout, request_id):
            opened = self._open(req, request_id)
            res = await asyncio.wait_for(opened.__aenter__(), timeout)
            try:
                if check:
                    check(res.headers)
                async for chunk in res.chunks():
                    yield chunk
            finally:
                await opened.__aexit__(None, None, None)

    @asynccontextmanager
    async def _open(self, req: Request, request_id: str) -> AsyncIterator[_Response]:
        """A 2xx response; a non-2xx one is raised as its CocoonError. The connection is closed on exit."""
        cfg = self.config
        reader, writer = await asyncio.open_connection(
            cfg.host, cfg.port, ssl=ssl.create_default_context() if cfg.tls else None, limit=MAX_HEAD_BYTES
        )
        try:
            body, content_type = req.payload()
            headers = headers_for(cfg, req, content_type, request_id)
            headers.update({"host": cfg.host_header, "connection": "close"})
            if isinstance(body, (bytes, bytearray)):
                headers["content-length"] = str(len(body))
            elif body is not None:
                headers["transfer-encoding"] = "chunked"
            head = f"{req.method} {cfg.target(req.path, req.query)} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            writer.write(head.encode("latin-1"))
            if isinstance(body, (bytes, bytearray)):
                writer.write(body)
            elif body is not None:
                async for piece in body:  # an async iterable of bytes, sent chunked
                    if piece:
                        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        await writer.drain()
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            while True:
                status, resp_headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
                if not 100 <= status < 200:
                    break  # an interim 1xx answer is followed by the real one
            res = _Response(status, resp_headers, reader)
            if not 200 <= status < 300:
                raise error_from_response(status, await res.read(MAX_ERROR_BODY_BYTES), request_id)
            yield res
        finally:
            writer.close()

    def _mapped(self, req: Request, timeout: Optional[float], request_id: str) -> "_ErrorMapping":
        return _ErrorMapping(self.config, req, timeout, request_id)


class _ErrorMapping:
    """Maps asyncio, socket, TLS and protocol failures to TimeoutError / ConnectionError; cancellation passes through."""

    def __init__(self, config: Config, req: Request, timeout: Optional[float], request_id: str) -> None:
        self.config, self.req, self.timeout, self.request_id = config, req, timeout, request_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Optional[BaseException], tb: Any) -> bool:
        if err is None or isinstance(err, (CocoonError, asyncio.CancelledError, GeneratorExit)) or not isinstance(err, Exception):
            return False
        if isinstance(err, asyncio.TimeoutError):
            raise TimeoutError(f"{self.req.method} {self.req.path} did not complete within {self.timeout} s", code="Timeout", request_id=self.request_id) from err
        if isinstance(err, (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)):
            why = getattr(err, "strerror", None) or str(err) or type(err).__name__
            raise ConnectionError(f"cannot reach Cocoon at {self.config.base_url}: {why}", code="Connection", request_id=self.request_id) from err
        return False
