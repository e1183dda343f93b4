"""cocoon: the Python client of the Cocoon HTTP API (API.md), sync (:class:`Cocoon`)
and asyncio (:class:`AsyncCocoon`), with no dependencies beyond the standard library.

>>> from cocoon import Cocoon
>>> client = Cocoon()  # COCOON_URL, COCOON_API_KEY
>>> with client.microvms.create() as vm:
...     print(vm.exec("echo hello").stdout)
"""

from ._terminal import AsyncTerminal, Terminal
from .aio import AsyncCocoon, AsyncFiles, AsyncImages, AsyncKeys, AsyncMicroVm, AsyncMicroVmPage, AsyncMicroVms, AsyncTenants, CreatingMicroVm
from .client import Cocoon, Files, Images, Keys, MicroVm, MicroVmPage, MicroVms, Tenants
from .errors import (
    CapacityExceededError,
    CocoonError,
    CommandNotFoundError,
    ConflictError,
    ConnectionError,
    ForbiddenError,
    InternalError,
    InvalidStateError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    TimeoutError,
    UnauthorizedError,
    ValidationError,
)
from .types import (
    Command,
    CreatedKey,
    Egress,
    Endpoint,
    ExecEvent,
    ExecResult,
    FileEntry,
    Health,
    IdlePolicy,
    ImageInfo,
    KeyInfo,
    Metrics,
    MetricsSample,
    MicroVmEvent,
    MicroVmInfo,
    MicroVmState,
    TenantInfo,
    WriteInfo,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncCocoon",
    "AsyncFiles",
    "AsyncImages",
    "AsyncKeys",
    "AsyncMicroVm",
    "AsyncMicroVmPage",
    "AsyncMicroVms",
    "AsyncTenants",
    "AsyncTerminal",
    "CapacityExceededError",
    "Cocoon",
    "CocoonError",
    "Command",
    "CommandNotFoundError",
    "ConflictError",
    "ConnectionError",
    "CreatedKey",
    "CreatingMicroVm",
    "Egress",
    "Endpoint",
    "ExecEvent",
    "ExecResult",
    "FileEntry",
    "Files",
    "ForbiddenError",
    "Health",
    "IdlePolicy",
    "ImageInfo",
    "Images",
    "InternalError",
    "InvalidStateError",
    "KeyInfo",
    "Keys",
    "Metrics",
    "MetricsSample",
    "MicroVm",
    "MicroVmEvent",
    "MicroVmInfo",
    "MicroVmPage",
    "MicroVmState",
    "MicroVms",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "TenantInfo",
    "Tenants",
    "Terminal",
    "TimeoutError",
    "UnauthorizedError",
    "ValidationError",
    "WriteInfo",
]
