"""The requests of the Cocoon API (docs/api.md), built once for both clients: the sync
and async classes only send them and read the answers."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union
from urllib.parse import quote

from ._http import Request, image_path, multipart, parse_ndjson, vm_path
from .errors import CocoonError, ValidationError
from .types import Command, ExecEvent, IdlePolicy, ImageInfo

EgressArg = Union[str, Sequence[str], Dict[str, List[str]]]
"""``"none"``, ``"internet"``, an allow-list of CIDRs and host names, or the API's ``{"allow": [...]}``."""

VolumeArg = Union[Dict[str, Any], Sequence[Any]]
"""A volume to attach: ``{"name", "path", "readOnly"?}`` as the API takes it, or a ``(name, path[, read_only])`` tuple."""

CodeArg = Union[bytes, str, "os.PathLike[str]"]
"""The build context as a .zip: its bytes, or the path of a .zip file."""


def egress_to_api(egress: EgressArg) -> Any:
    if isinstance(egress, str):
        return egress
    if isinstance(egress, dict):
        return egress
    return {"allow": list(egress)}


def create_microvm(
    image: str,
    *,
    vcpus: Optional[int],
    memory_mib: Optional[int],
    disk_gib: Optional[int],
    env: Optional[Dict[str, str]],
    idle_policy: Union[IdlePolicy, Dict[str, Any], None],
    max_runtime_seconds: Optional[int],
    egress: Optional[EgressArg],
    public_endpoint: Optional[bool],
    app_port: Optional[int],
    metadata: Optional[Dict[str, Any]],
    volumes: Optional[Sequence[VolumeArg]] = None,
) -> Request:
    body: Dict[str, Any] = {"image": image}
    for key, value in (("vcpus", vcpus), ("memoryMiB", memory_mib), ("diskGiB", disk_gib), ("env", env), ("maxRuntimeSeconds", max_runtime_seconds), ("appPort", app_port), ("metadata", metadata)):
        if value is not None:
            body[key] = value
    if idle_policy is not None:
        body["idlePolicy"] = idle_policy.to_api() if isinstance(idle_policy, IdlePolicy) else idle_policy
    if egress is not None:
        body["network"] = {"egress": egress_to_api(egress)}
    if public_endpoint is not None:
        body["endpoint"] = {"public": public_endpoint}
    if volumes is not None:
        body["volumes"] = [volume_to_api(v) for v in volumes]
    return Request("POST", "/v1/microvms", json=body)


def volume_to_api(volume: VolumeArg) -> Dict[str, Any]:
    if isinstance(volume, dict):
        return volume
    name, path, *rest = volume
    return {"name": name, "path": path, "readOnly": bool(rest and rest[0])}


def create_volume(name: str, size_gib: int) -> Request:
    return Request("POST", "/v1/volumes", json={"name": name, "sizeGiB": size_gib})


def list_volumes() -> Request:
    return Request("GET", "/v1/volumes")


def get_volume(id_or_name: str) -> Request:
    return Request("GET", f"/v1/volumes/{quote(id_or_name, safe='')}")


def delete_volume(id_or_name: str) -> Request:
    return Request("DELETE", f"/v1/volumes/{quote(id_or_name, safe='')}")


def list_microvms(state: Optional[str], image: Optional[str], limit: Optional[int], next_token: Optional[str]) -> Request:
    return Request("GET", "/v1/microvms", query={"state": state, "image": image, "limit": limit, "nextToken": next_token})


def describe(microvm_id: str) -> Request:
    return Request("GET", vm_path(microvm_id))


def suspend(microvm_id: str) -> Request:
    return Request("POST", vm_path(microvm_id, "/suspend"))


def resume(microvm_id: str) -> Request:
    return Request("POST", vm_path(microvm_id, "/resume"))


def fork(microvm_id: str, count: int) -> Request:
    return Request("POST", vm_path(microvm_id, "/fork"), json={"count": count})


def snapshot(microvm_id: str, name: str) -> Request:
    return Request("POST", vm_path(microvm_id, "/snapshots"), json={"name": name})


def terminate(microvm_id: str) -> Request:
    return Request("DELETE", vm_path(microvm_id))


def events(microvm_id: str) -> Request:
    return Request("GET", vm_path(microvm_id, "/events"))


def metrics(microvm_id: str) -> Request:
    return Request("GET", vm_path(microvm_id, "/metrics"))


def logs(microvm_id: str, follow: bool) -> Request:
    return Request("GET", vm_path(microvm_id, "/logs"), query={"follow": True if follow else None})


def exec_command(
    microvm_id: str,
    command: Command,
    *,
    env: Optional[Dict[str, str]],
    cwd: Optional[str],
    user: Optional[str],
    stdin: Optional[str],
    timeout_seconds: Optional[float],
    stream: bool,
) -> Request:
    body: Dict[str, Any] = {"command": command if isinstance(command, str) else list(command)}
    for key, value in (("env", env), ("cwd", cwd), ("user", user), ("stdin", stdin), ("timeoutSeconds", timeout_seconds)):
        if value is not None:
            body[key] = value
    return Request("POST", vm_path(microvm_id, "/exec"), json=body, accept="application/x-ndjson" if stream else None)


def exec_events(lines: List[str]) -> List[ExecEvent]:
    """The events of streamed exec's NDJSON lines (lines of unknown kinds skipped)."""
    events = (ExecEvent.from_api(parse_ndjson(line)) for line in lines)
    return [e for e in events if e is not None]


def files(method: str, microvm_id: str, path: str, body: Any = None) -> Request:
    return Request(method, vm_path(microvm_id, "/files"), query={"path": path}, body=body, content_type="application/octet-stream" if method == "PUT" else None)


def file_body(data: Union[str, bytes, bytearray, memoryview]) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def create_image(name: str, dockerfile: str, code: Optional[CodeArg], code_uri: Optional[str]) -> Request:
    """With ``code`` a ``multipart/form-data`` upload (``name``, ``dockerfile``, ``code`` as ``code.zip``); with ``code_uri`` JSON."""
    if (code is None) == (code_uri is None):
        raise ValidationError("images.create needs exactly one of code and code_uri", code="ValidationError", status=400, details={"field": "code"})
    if code_uri is not None:
        return Request("POST", "/v1/images", json={"name": name, "dockerfile": dockerfile, "codeUri": code_uri})
    if isinstance(code, (bytes, bytearray, memoryview)):
        zipped = bytes(code)
    else:
        with open(os.fspath(code), "rb") as f:  # type: ignore[arg-type]
            zipped = f.read()
    body, content_type = multipart({"name": name, "dockerfile": dockerfile, "code": ("code.zip", zipped, "application/zip")})
    return Request("POST", "/v1/images", body=body, content_type=content_type)


def get_image(id_or_name: str) -> Request:
    return Request("GET", image_path(id_or_name))


def list_images() -> Request:
    return Request("GET", "/v1/images")


def delete_image(id_or_name: str, force: bool) -> Request:
    return Request("DELETE", image_path(id_or_name), query={"force": True if force else None})


def build_log(id_or_name: str, follow: bool) -> Request:
    return Request("GET", image_path(id_or_name, "/build-log"), query={"follow": True if follow else None})


def create_key(tenant: str, permissions: Sequence[str], description: Optional[str]) -> Request:
    body: Dict[str, Any] = {"tenant": tenant, "permissions": list(permissions)}
    if description is not None:
        body["description"] = description
    return Request("POST", "/v1/keys", json=body)


def list_keys() -> Request:
    return Request("GET", "/v1/keys")


def revoke_key(key_id: str) -> Request:
    return Request("DELETE", f"/v1/keys/{quote(key_id, safe='')}")


def create_tenant(name: str) -> Request:
    return Request("POST", "/v1/tenants", json={"name": name})


def health() -> Request:
    return Request("GET", "/v1/health")


def build_failed(image: ImageInfo) -> CocoonError:
    """The error ``wait_until_ready`` raises for a FAILED image."""
    reason = f": {image.state_reason}" if image.state_reason else ""
    return CocoonError(f"image {image.name} failed to build{reason}", code="ImageBuildFailed", details={"imageId": image.image_id})
