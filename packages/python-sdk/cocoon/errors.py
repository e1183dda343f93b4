"""Errors raised by the SDK.

Every failure is a :class:`CocoonError`; an API error is the subclass of its
``code`` (the server's ``{"error": {code, message, details}}`` body), as in the
TypeScript SDK's ``errors.ts``. :class:`TimeoutError` and :class:`ConnectionError`
also derive from Python's built-in exceptions of those names, so ``except
TimeoutError`` catches a Cocoon timeout whichever of the two is in scope.
"""

from __future__ import annotations

import builtins
import json
from typing import Any, Dict, Optional, Tuple, Type


class CocoonError(Exception):
    """The root of every error the SDK raises."""

    code: str
    """The API error code, e.g. ``NotFound``; ``Timeout``/``Connection`` for failures the SDK detects itself."""
    status: int
    """HTTP status; 0 when no response arrived (timeout, connection failure)."""
    message: str
    details: Dict[str, Any]
    """Extra facts from the server, e.g. ``{"field": "memoryMiB"}``; ``{}`` when none."""
    request_id: Optional[str]
    """The ``x-request-id`` the call was sent with (the server logs 5xx details under it)."""

    def __init__(self, message: str, *, code: str, status: int = 0, details: Optional[Dict[str, Any]] = None, request_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.details = details or {}
        self.request_id = request_id

    @property
    def field(self) -> Optional[str]:
        """The field a ValidationError is about (``details["field"]``), when the server named one."""
        value = self.details.get("field")
        return value if isinstance(value, str) else None

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"


class ValidationError(CocoonError):
    """Raised when the request is malformed or a field is out of range (400); ``field`` names the field."""


class CommandNotFoundError(CocoonError):
    """Raised when exec's program does not exist in the VM (400)."""


class UnauthorizedError(CocoonError):
    """Raised when the API key is missing, unknown or revoked (401)."""


class ForbiddenError(CocoonError):
    """Raised when the API key lacks the permission the call needs (403); ``details["permission"]`` names it."""


class NotFoundError(CocoonError):
    """Raised when the resource does not exist in the key's tenant (404)."""


class InvalidStateError(CocoonError):
    """Raised when the resource's state does not allow the action, e.g. suspending a SUSPENDED VM (409)."""


class ConflictError(CocoonError):
    """Raised when the resource already exists or is in use (409)."""


class PayloadTooLargeError(CocoonError):
    """Raised when the request body (413) or its headers (431) exceed their limit."""


class RateLimitError(CocoonError):
    """Raised when too many requests of a kind are in progress (429); retry later."""


class QuotaExceededError(CocoonError):
    """Raised when a quota of the tenant or of a resource is reached (429); the message names it and the limit."""


class CapacityExceededError(CocoonError):
    """Raised when the host has no capacity for the VM right now (503); retry later."""


class InternalError(CocoonError):
    """Raised on a server fault (5xx); the server log has the details under ``request_id``."""


class BadGatewayError(CocoonError):
    """Raised when a VM's app or agent answered garbage or did not answer (502)."""


class MisdirectedRequestError(CocoonError):
    """Raised by a cluster node that does not run the VM and cannot forward to the node that does (421); ``details`` names it."""


class TimeoutError(CocoonError, builtins.TimeoutError):  # noqa: A001 (mirrors the TypeScript SDK's name)
    """Raised when a call did not complete within its ``request_timeout_seconds``, or the server did not receive the request within its own limit (408)."""


class ConnectionError(CocoonError, builtins.ConnectionError):  # noqa: A001
    """Raised when the server could not be reached (connection refused or reset, DNS, TLS)."""


# Every code of the API's ErrorCode (its OpenAPI document); test/unit/api-contract.test.ts keeps them equal.
_BY_CODE: Dict[str, Type[CocoonError]] = {
    "ValidationError": ValidationError,
    "CommandNotFound": CommandNotFoundError,
    "Unauthorized": UnauthorizedError,
    "Forbidden": ForbiddenError,
    "NotFound": NotFoundError,
    "RequestTimeout": TimeoutError,
    "InvalidState": InvalidStateError,
    "Conflict": ConflictError,
    "PayloadTooLarge": PayloadTooLargeError,
    "UnsupportedMediaType": ValidationError,
    "QuotaExceeded": QuotaExceededError,
    "RateLimited": RateLimitError,
    "HeadersTooLarge": PayloadTooLargeError,
    "CapacityExceeded": CapacityExceededError,
    "Internal": InternalError,
    "BadGateway": BadGatewayError,
    "MisdirectedRequest": MisdirectedRequestError,
}

# For bodies without a known code (a proxy's answer, a future code): the class of the status.
_BY_STATUS: Dict[int, Tuple[str, Type[CocoonError]]] = {
    400: ("ValidationError", ValidationError),
    401: ("Unauthorized", UnauthorizedError),
    403: ("Forbidden", ForbiddenError),
    404: ("NotFound", NotFoundError),
    409: ("Conflict", ConflictError),
    413: ("PayloadTooLarge", PayloadTooLargeError),
    429: ("RateLimited", RateLimitError),
    503: ("CapacityExceeded", CapacityExceededError),
}


def error_from_response(status: int, body: bytes, request_id: Optional[str]) -> CocoonError:
    """The error for a non-2xx response, from its status and (possibly absent or non-JSON) body."""
    parsed: Dict[str, Any] = {}
    try:
        envelope = json.loads(body)
        if isinstance(envelope, dict) and isinstance(envelope.get("error"), dict):
            parsed = envelope["error"]
    except ValueError:
        pass  # not JSON: a proxy or a crash; described by the status below
    code = parsed.get("code") if isinstance(parsed.get("code"), str) else None
    text = body[:200].decode("utf-8", "replace")
    message = parsed["message"] if isinstance(parsed.get("message"), str) else f"HTTP {status}" + (f": {text}" if text else "")
    details = parsed["details"] if isinstance(parsed.get("details"), dict) else None
    fallback = _BY_STATUS.get(status) or (("Internal", InternalError) if status >= 500 else ("Unknown", CocoonError))
    cls = _BY_CODE.get(code or "", fallback[1])
    return cls(message, code=code or fallback[0], status=status, details=details, request_id=request_id)
