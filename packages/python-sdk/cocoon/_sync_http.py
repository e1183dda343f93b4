"""The sync client's transport: one ``http.client`` connection per call, a
deadline per call, and every failure mapped to a CocoonError."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Generator, Iterator, Optional, Tuple

from ._http import MAX_ERROR_BODY_BYTES, READ_CHUNK_BYTES, Config, Request, headers_for, new_request_id
from .errors import CocoonError, ConnectionError, TimeoutError, error_from_response


class _Deadline:
    """The time left of one call; None: no limit."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.seconds = seconds
        self._at = None if seconds is None else time.monotonic() + seconds

    def left(self) -> Optional[float]:
        if self._at is None:
            return None
        left = self._at - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        return left


class SyncTransport:
    """The one place the sync client makes requests: base URL, auth, request ids, timeouts and error mapping."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def json(self, req: Request, timeout: Optional[float]) -> Any:
        """Sends and returns the parsed JSON answer (None for an empty body)."""
        data, _ = self.bytes(req, timeout)
        return json.loads(data) if data else None

    def bytes(self, req: Request, timeout: Optional[float]) -> Tuple[bytes, str]:
        """Sends and returns the whole answer and its content type; ``timeout`` (seconds, None: none) bounds the whole call."""
        deadline = _Deadline(timeout)
        request_id = new_request_id()
        with self._mapped(req, deadline, request_id), self._open(req, deadline, request_id) as (sock, res):
            chunks = []
            while True:
                sock.settimeout(deadline.left())
                chunk = res.read1(READ_CHUNK_BYTES)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks), res.getheader("content-type") or ""

    def stream(self, req: Request, timeout: Optional[float], check: Optional[Callable[[Dict[str, str]], None]] = None) -> Generator[bytes, None, None]:
        """The answer's body as chunks, as it comes. The request is sent on the
        first ``next()``; ``timeout`` bounds the wait for the response headers
        only, which ``check`` may refuse by raising. Closing the iterator (or
        leaving a ``for`` loop early) closes the connection."""
        deadline = _Deadline(timeout)
        request_id = new_request_id()
        with self._mapped(req, deadline, request_id), self._open(req, deadline, request_id) as (sock, res):
            if check:
                check({k.lower(): v for k, v in res.getheaders()})
            sock.settimeout(None)  # the stream runs as long as the caller reads it
            while True:
                chunk = res.read1(READ_CHUNK_BYTES)
                if not chunk:
                    return
                yield chunk

    @contextmanager
    def _open(self, req: Request, deadline: _Deadline, request_id: str) -> Iterator[Tuple[socket.socket, http.client.HTTPResponse]]:
        """A 2xx response with its socket; a non-2xx one is raised as its CocoonError. The connection is closed on exit."""
        if self.config.tls:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(self.config.host, self.config.port, timeout=deadline.left(), context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self.config.host, self.config.port, timeout=deadline.left())
        res: Optional[http.client.HTTPResponse] = None
        try:
            body, content_type = req.payload()
            conn.request(req.method, self.config.target(req.path, req.query), body=body, headers=headers_for(self.config, req, content_type, request_id))
            sock = conn.sock
            assert sock is not None  # connected by request()
            sock.settimeout(deadline.left())
            res = conn.getresponse()
            if not 200 <= res.status < 300:
                raise error_from_response(res.status, res.read(MAX_ERROR_BODY_BYTES), request_id)
            yield sock, res
        finally:
            # The response may own the socket by now (a Connection: close answer): close both.
            if res is not None:
                res.close()
            conn.close()

    @contextmanager
    def _mapped(self, req: Request, deadline: _Deadline, request_id: str) -> Iterator[None]:
        """Maps socket, TLS and protocol failures to TimeoutError / ConnectionError."""
        try:
            yield
        except CocoonError:
            raise
        except socket.timeout as err:
            raise TimeoutError(f"{req.method} {req.path} did not complete within {deadline.seconds} s", code="Timeout", request_id=request_id) from err
        except (OSError, http.client.HTTPException) as err:
            why = getattr(err, "strerror", None) or str(err) or type(err).__name__
            raise ConnectionError(f"cannot reach Cocoon at {self.config.base_url}: {why}", code="Connection", request_id=request_id) from err
