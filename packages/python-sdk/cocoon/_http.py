"""The I/O-free half of the SDK's HTTP: configuration, requests, response heads,
line splitting and multipart bodies, shared by the sync transport (http.client)
and the async one (asyncio streams)."""

from __future__ import annotations

import codecs
import json as jsonlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import quote, urlencode, urlsplit

from .errors import ValidationError

DEFAULT_BASE_URL = "http://127.0.0.1:7070"
DEFAULT_TIMEOUT_SECONDS = 120.0
"""Default for every call's ``request_timeout_seconds``: 2 minutes."""
EXEC_SLACK_SECONDS = 30.0
"""Seconds an exec call waits beyond the command's own ``timeout_seconds``, so the
server's timeout (a result with ``timed_out``) answers before the client gives up."""
MAX_ERROR_BODY_BYTES = 64 * 1024
"""An error body is read up to this much; the API's envelopes are far smaller."""
READ_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Config:
    """What every request of one client shares."""

    base_url: str
    api_key: Optional[str]
    timeout_seconds: float
    """0 waits forever."""
    tls: bool = field(init=False)
    host: str = field(init=False)
    port: int = field(init=False)
    base_path: str = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {self.base_url!r}")
        if self.timeout_seconds < 0:
            raise ValueError(f"request_timeout_seconds must be >= 0 (0 waits forever), got {self.timeout_seconds}")
        object.__setattr__(self, "tls", parts.scheme == "https")
        object.__setattr__(self, "host", parts.hostname)
        object.__setattr__(self, "port", parts.port or (443 if parts.scheme == "https" else 80))
        object.__setattr__(self, "base_path", parts.path.rstrip("/"))

    @classmethod
    def make(cls, base_url: Optional[str], api_key: Optional[str], timeout_seconds: Optional[float]) -> "Config":
        """Arguments first, then ``COCOON_URL`` / ``COCOON_API_KEY``, then the defaults."""
        return cls(
            base_url=base_url or os.environ.get("COCOON_URL") or DEFAULT_BASE_URL,
            api_key=api_key if api_key is not None else os.environ.get("COCOON_API_KEY"),
            timeout_seconds=DEFAULT_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds,
        )

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    def target(self, path: str, query: Optional[Dict[str, Any]] = None) -> str:
        """The request target: base path, path and the query without its None values."""
        pairs = [(k, _query_value(v)) for k, v in (query or {}).items() if v is not None]
        return self.base_path + path + (f"?{urlencode(pairs)}" if pairs else "")

    def timeout_for(self, request_timeout_seconds: Optional[float]) -> Optional[float]:
        """A call's limit in seconds (its own, else the client's); None when it waits forever."""
        seconds = self.timeout_seconds if request_timeout_seconds is None else request_timeout_seconds
        if seconds < 0:
            raise ValueError(f"request_timeout_seconds must be >= 0 (0 waits forever), got {seconds}")
        return None if seconds == 0 else seconds


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class Request:
    method: str
    path: str
    query: Optional[Dict[str, Any]] = None
    json: Any = None
    """Sent as ``application/json`` when not None."""
    body: Any = None
    """Sent as is: bytes, or a stream (a file object for the sync client, an async iterable of bytes for the async one)."""
    content_type: Optional[str] = None
    accept: Optional[str] = None

    def payload(self) -> Tuple[Any, Optional[str]]:
        """The body to send and its content type."""
        if self.json is not None:
            return jsonlib.dumps(self.json).encode(), "application/json"
        return self.body, self.content_type


def headers_for(config: Config, req: Request, content_type: Optional[str], request_id: str) -> Dict[str, str]:
    headers = {"x-request-id": request_id, "user-agent": "cocoon-python/0.1.0"}
    if config.api_key:
        headers["authorization"] = f"Bearer {config.api_key}"
    if req.accept:
        headers["accept"] = req.accept
    if content_type:
        headers["content-type"] = content_type
    return headers


def new_request_id() -> str:
    return str(uuid.uuid4())


def vm_path(microvm_id: str, rest: str = "") -> str:
    return f"/v1/microvms/{quote(microvm_id, safe='')}{rest}"


def image_path(id_or_name: str, rest: str = "") -> str:
    return f"/v1/images/{quote(id_or_name, safe='')}{rest}"


def parse_head(block: bytes) -> Tuple[int, Dict[str, str]]:
    """Status and headers (lower-case names) of an HTTP/1.1 response head, up to its blank line."""
    lines = block.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/") or not status_line[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed response header: {line[:80]!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(status_line[1]), headers


class LineSplitter:
    """Splits a byte stream into lines of UTF-8 text (without the newline; blank lines dropped)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buffered = ""

    def feed(self, data: bytes) -> List[str]:
        self._buffered += self._decoder.decode(data)
        *complete, self._buffered = self._buffered.split("\n")
        return [line for line in complete if line.strip()]

    def end(self) -> List[str]:
        rest = self._buffered + self._decoder.decode(b"", final=True)
        self._buffered = ""
        return [rest] if rest.strip() else []


def text_decoder() -> "codecs.IncrementalDecoder":
    """Decodes UTF-8 chunks, holding back a character split across two chunks."""
    return codecs.getincrementaldecoder("utf-8")("replace")


def parse_ndjson(line: str) -> Dict[str, Any]:
    value = jsonlib.loads(line)
    return value if isinstance(value, dict) else {}


FilePart = Tuple[str, bytes, str]
"""A file field of a multipart body: (file name, content, content type)."""


def multipart(fields: Dict[str, Union[str, FilePart]]) -> Tuple[bytes, str]:
    """A ``multipart/form-data`` body and its content type (with the boundary)."""
    boundary = f"cocoon-{uuid.uuid4().hex}"
    out = bytearray()
    for name, value in fields.items():
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, content, ctype = value
            out += f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
            out += content
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            out += value.encode()
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def exec_timeout(timeout_seconds: Optional[float], request_timeout_seconds: Optional[float], config: Config) -> Optional[float]:
    """An exec call's limit: the caller's, else the client's stretched to outlast the command's own (default 60 s)."""
    if request_timeout_seconds is not None:
        return config.timeout_for(request_timeout_seconds)
    client = config.timeout_for(None)
    if client is None:
        return None
    return max(client, (60.0 if timeout_seconds is None else timeout_seconds) + EXEC_SLACK_SECONDS)


def not_a_file(path: str) -> ValidationError:
    return ValidationError(f"{path} is a directory; use files.list", code="ValidationError", status=400, details={"field": "path"})


def not_a_directory(path: str) -> ValidationError:
    return ValidationError(f"{path} is a file, not a directory", code="ValidationError", status=400, details={"field": "path"})
