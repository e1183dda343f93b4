"""Resource shapes of the Cocoon API (docs/api.md) as dataclasses with snake_case fields.

Times are ISO-8601 strings as the API sends them. Each result keeps the whole
JSON object it was read from in ``raw`` (camelCase), so fields a newer server
adds are never lost. The server may add fields; none is removed within v1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

MicroVmState = Literal["PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "RESUMING", "TERMINATING", "TERMINATED", "FAILED"]
"""A microVM's lifecycle state: PENDING → RUNNING → SUSPENDING → SUSPENDED → RESUMING → RUNNING;
PENDING, RUNNING, SUSPENDED or FAILED → TERMINATING → TERMINATED; any but TERMINATED → FAILED.
(The server's OpenAPI document's MicroVmState; test/unit/api-contract.test.ts keeps them equal.)"""

ImageState = Literal["PENDING", "BUILDING", "READY", "FAILED", "DELETING"]
"""An image's state: PENDING (waiting for a build slot) → BUILDING → READY; PENDING or BUILDING → FAILED;
READY or FAILED → DELETING. (The OpenAPI document's ImageState, kept equal by the same test.)"""

Egress = Union[Literal["none", "internet"], Dict[str, List[str]]]
"""Outbound network access as the API writes it: ``"none"``, ``"internet"``, or ``{"allow": [CIDRs and host names]}``."""

Command = Union[str, List[str]]
"""An argv list (run as is) or a string (run through ``/bin/sh -c``)."""


@dataclass
class IdlePolicy:
    """Idle auto-suspend and auto-resume. As input, ``None`` leaves the server's default (900 s, auto-resume on)."""

    suspend_after_seconds: Optional[int] = None
    """Suspend after this many seconds without activity (requests, exec, files); 0 never."""
    auto_resume: Optional[bool] = None
    """Resume a suspended VM on its next request or exec."""

    def to_api(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.suspend_after_seconds is not None:
            out["suspendAfterSeconds"] = self.suspend_after_seconds
        if self.auto_resume is not None:
            out["autoResume"] = self.auto_resume
        return out

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "IdlePolicy":
        return cls(suspend_after_seconds=obj.get("suspendAfterSeconds"), auto_resume=obj.get("autoResume"))


@dataclass
class Endpoint:
    """The VM's application endpoint: ``url`` is ``http://{id}.{domain}:{port}/``; ``token`` authorizes requests to it."""

    url: str
    public: bool
    token: Optional[str] = None
    app_port: Optional[int] = None
    """The guest port the endpoint reaches."""

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "Endpoint":
        return cls(url=obj.get("url", ""), public=bool(obj.get("public")), token=obj.get("token"), app_port=obj.get("appPort"))


@dataclass
class MicroVmInfo:
    """A microVM as the API describes it (``GET /v1/microvms/{id}``)."""

    microvm_id: str
    image: str
    """The image name it was created from."""
    image_id: str
    state: MicroVmState
    vcpus: int
    memory_mib: int
    disk_gib: int
    created_at: str
    expires_at: str
    """When max runtime ends the VM."""
    last_activity_at: str
    idle_policy: IdlePolicy
    max_runtime_seconds: int
    egress: Egress
    endpoint: Endpoint
    metadata: Dict[str, Any]
    state_reason: Optional[str] = None
    """Why it is in its state, e.g. the failure of a FAILED VM."""
    terminated_at: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "MicroVmInfo":
        return cls(
            microvm_id=obj["microVmId"],
            image=obj.get("image", ""),
            image_id=obj.get("imageId", ""),
            state=obj["state"],
            vcpus=obj.get("vcpus", 0),
            memory_mib=obj.get("memoryMiB", 0),
            disk_gib=obj.get("diskGiB", 0),
            created_at=obj.get("createdAt", ""),
            expires_at=obj.get("expiresAt", ""),
            last_activity_at=obj.get("lastActivityAt", ""),
            idle_policy=IdlePolicy.from_api(obj.get("idlePolicy") or {}),
            max_runtime_seconds=obj.get("maxRuntimeSeconds", 0),
            egress=(obj.get("network") or {}).get("egress", "none"),
            endpoint=Endpoint.from_api(obj.get("endpoint") or {}),
            metadata=obj.get("metadata") or {},
            state_reason=obj.get("stateReason"),
            terminated_at=obj.get("terminatedAt"),
            raw=obj,
        )


@dataclass
class ExecResult:
    """The whole output of a command once it exited. A non-zero exit is a result, not an error."""

    exit_code: int
    stdout: str
    stderr: str
    duration_ms: int
    timed_out: bool = False
    """The command was killed at its ``timeout_seconds``."""

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "ExecResult":
        return cls(exit_code=obj["exitCode"], stdout=obj.get("stdout", ""), stderr=obj.get("stderr", ""), duration_ms=obj.get("durationMs", 0), timed_out=bool(obj.get("timedOut")))


@dataclass
class ExecEvent:
    """One event of a streamed exec: ``stdout``/``stderr`` output (``data``) as it comes, then one ``exit``."""

    type: Literal["stdout", "stderr", "exit"]
    data: str = ""
    exit_code: Optional[int] = None
    """Set on the ``exit`` event."""
    duration_ms: Optional[int] = None
    timed_out: bool = False

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> Optional["ExecEvent"]:
        """The event of one NDJSON line; None for a line of no known kind (a newer server's)."""
        if "stdout" in obj:
            return cls(type="stdout", data=obj["stdout"])
        if "stderr" in obj:
            return cls(type="stderr", data=obj["stderr"])
        if "exitCode" in obj:
            return cls(type="exit", exit_code=obj["exitCode"], duration_ms=obj.get("durationMs"), timed_out=bool(obj.get("timedOut")))
        return None


@dataclass
class FileEntry:
    """One entry of a directory listing."""

    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    """Bytes."""
    mode: str
    """Octal permission bits, e.g. ``"0644"``."""
    mtime: str

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "FileEntry":
        return cls(name=obj["name"], type=obj.get("type", "other"), size=obj.get("size", 0), mode=obj.get("mode", ""), mtime=obj.get("mtime", ""))


@dataclass
class WriteInfo:
    path: str
    size: int
    """Bytes written."""

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "WriteInfo":
        return cls(path=obj["path"], size=obj.get("size", 0))


@dataclass
class MicroVmEvent:
    """A lifecycle event: created, suspended (idle), resumed (request), terminated (max runtime), …"""

    type: str
    message: str
    at: str

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "MicroVmEvent":
        return cls(type=obj.get("type", ""), message=obj.get("message", ""), at=obj.get("at", ""))


@dataclass
class MetricsSample:
    at: str
    cpu_percent: float
    memory_used_mib: float

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "MetricsSample":
        return cls(at=obj.get("at", ""), cpu_percent=obj.get("cpuPercent", 0), memory_used_mib=obj.get("memoryUsedMiB", 0))


@dataclass
class Metrics:
    """Current figures of a VM (zero when it is not running) and its recent samples, oldest first."""

    cpu_percent: float
    memory_used_mib: float
    disk_used_mib: float
    net_rx_bytes: int
    net_tx_bytes: int
    samples: List[MetricsSample]
    at: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "Metrics":
        return cls(
            cpu_percent=obj.get("cpuPercent", 0),
            memory_used_mib=obj.get("memoryUsedMiB", 0),
            disk_used_mib=obj.get("diskUsedMiB", 0),
            net_rx_bytes=obj.get("netRxBytes", 0),
            net_tx_bytes=obj.get("netTxBytes", 0),
            samples=[MetricsSample.from_api(s) for s in obj.get("samples") or []],
            at=obj.get("at"),
            raw=obj,
        )


@dataclass
class ImageInfo:
    """An image (``GET /v1/images/{id}``); ``state`` is an :data:`ImageState`."""

    image_id: str
    name: str
    state: ImageState
    created_at: str
    state_reason: Optional[str] = None
    ready_at: Optional[str] = None
    size_bytes: Optional[int] = None
    app_port: Optional[int] = None
    dockerfile_digest: Optional[str] = None
    code_digest: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "ImageInfo":
        return cls(
            image_id=obj["imageId"],
            name=obj.get("name", ""),
            state=obj.get("state", ""),
            created_at=obj.get("createdAt", ""),
            state_reason=obj.get("stateReason"),
            ready_at=obj.get("readyAt"),
            size_bytes=obj.get("sizeBytes"),
            app_port=obj.get("appPort"),
            dockerfile_digest=obj.get("dockerfileDigest"),
            code_digest=obj.get("codeDigest"),
            raw=obj,
        )


@dataclass
class TenantInfo:
    tenant_id: str
    name: str
    created_at: str

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "TenantInfo":
        return cls(tenant_id=obj["tenantId"], name=obj.get("name", ""), created_at=obj.get("createdAt", ""))


@dataclass
class VolumeAttachment:
    """A microVM holding a volume, and where its guest mounts it."""

    microvm_id: str
    path: str
    read_only: bool


@dataclass
class VolumeInfo:
    """A persistent volume (``client.volumes``): an ext4 disk that outlives the microVMs it is attached to."""

    volume_id: str
    name: str
    size_gib: int
    state: str
    """``AVAILABLE``, or ``ATTACHED`` while a microVM that is neither TERMINATED nor FAILED holds it."""
    attached_to: List[VolumeAttachment] = field(default_factory=list)
    created_at: str = ""

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "VolumeInfo":
        attached = [VolumeAttachment(microvm_id=a["microVmId"], path=a.get("path", ""), read_only=bool(a.get("readOnly"))) for a in obj.get("attachedTo") or []]
        return cls(volume_id=obj["volumeId"], name=obj.get("name", ""), size_gib=obj.get("sizeGiB", 0), state=obj.get("state", ""), attached_to=attached, created_at=obj.get("createdAt", ""))


@dataclass
class CreatedKey:
    key_id: str
    api_key: str = field(repr=False)
    """The secret: returned this once, store it."""
    tenant_id: str = ""
    permissions: List[str] = field(default_factory=list)
    created_at: str = ""

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "CreatedKey":
        return cls(key_id=obj["keyId"], api_key=obj["apiKey"], tenant_id=obj.get("tenantId", ""), permissions=obj.get("permissions") or [], created_at=obj.get("createdAt", ""))


@dataclass
class KeyInfo:
    """An API key as listed (never its secret)."""

    key_id: str
    tenant_id: str
    permissions: List[str]
    created_at: str
    description: Optional[str] = None
    revoked_at: Optional[str] = None

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "KeyInfo":
        return cls(
            key_id=obj["keyId"],
            tenant_id=obj.get("tenantId", ""),
            permissions=obj.get("permissions") or [],
            created_at=obj.get("createdAt", ""),
            description=obj.get("description"),
            revoked_at=obj.get("revokedAt"),
        )


@dataclass
class Health:
    status: str
    accelerator: str
    """``kvm``, or ``tcg`` (software emulation: much slower VMs)."""
    version: str
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, obj: Dict[str, Any]) -> "Health":
        return cls(status=obj.get("status", ""), accelerator=obj.get("accelerator", ""), version=obj.get("version", ""), raw=obj)
