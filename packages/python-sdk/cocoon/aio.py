"""The asyncio client: the sync client's surface with ``await``. Every call takes
``request_timeout_seconds`` (the client's default if omitted; 0 waits forever);
cancelling the awaiting task closes the call's connection, and for exec the
server then kills the command."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Coroutine, Dict, Generator, List, Optional, Sequence, Union

from . import _api
from ._async_http import AsyncTransport
from ._http import Config, LineSplitter, exec_timeout, not_a_directory, not_a_file, text_decoder
from ._terminal import AsyncTerminal
from .errors import NotFoundError, TimeoutError
from .types import (
    Command,
    CreatedKey,
    ExecEvent,
    ExecResult,
    FileEntry,
    Health,
    IdlePolicy,
    ImageInfo,
    KeyInfo,
    Metrics,
    MicroVmEvent,
    MicroVmInfo,
    MicroVmState,
    TenantInfo,
    VolumeInfo,
    WriteInfo,
)


class AsyncCocoon:
    """An asyncio client of one Cocoon server (one connection per call).

    >>> client = AsyncCocoon()              # COCOON_URL, COCOON_API_KEY
    >>> async with client.microvms.create() as vm:
    ...     print((await vm.exec("echo hi")).stdout)
    """

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *, request_timeout_seconds: Optional[float] = None) -> None:
        """Arguments as for :class:`cocoon.Cocoon`."""
        self._http = AsyncTransport(Config.make(base_url, api_key, request_timeout_seconds))
        self.microvms = AsyncMicroVms(self._http)
        self.images = AsyncImages(self._http)
        self.volumes = AsyncVolumes(self._http)
        self.keys = AsyncKeys(self._http)
        self.tenants = AsyncTenants(self._http)

    @property
    def base_url(self) -> str:
        return self._http.config.base_url

    async def health(self, *, request_timeout_seconds: Optional[float] = None) -> Health:
        """``GET /v1/health`` (no key needed)."""
        return Health.from_api(await self._http.json(_api.health(), self._http.config.timeout_for(request_timeout_seconds)))


class CreatingMicroVm(Awaitable["AsyncMicroVm"]):
    """What ``microvms.create`` returns: await it for the VM, or use it as
    ``async with client.microvms.create() as vm:`` to terminate the VM on exit."""

    def __init__(self, create: Coroutine[Any, Any, "AsyncMicroVm"]) -> None:
        self._create = create
        self._vm: Optional[AsyncMicroVm] = None

    def __await__(self) -> Generator[Any, None, "AsyncMicroVm"]:
        return self._create.__await__()

    async def __aenter__(self) -> "AsyncMicroVm":
        self._vm = await self._create
        return self._vm

    async def __aexit__(self, *exc: object) -> None:
        if self._vm is not None:
            await self._vm.terminate()


class AsyncMicroVms:
    """``client.microvms``; see :class:`cocoon.client.MicroVms`."""

    def __init__(self, http: AsyncTransport) -> None:
        self._http = http

    def create(
        self,
        image: str = "base",
        *,
        vcpus: Optional[int] = None,
        memory_mib: Optional[int] = None,
        disk_gib: Optional[int] = None,
        env: Optional[Dict[str, str]] = None,
        idle_policy: Union[IdlePolicy, Dict[str, Any], None] = None,
        max_runtime_seconds: Optional[int] = None,
        egress: Optional[_api.EgressArg] = None,
        public_endpoint: Optional[bool] = None,
        app_port: Optional[int] = None,
        metadata: Optional[Dict[str, Any]] = None,
        volumes: Optional[Sequence[_api.VolumeArg]] = None,
        request_timeout_seconds: Optional[float] = None,
    ) -> CreatingMicroVm:
        """Creates a microVM; the awaited result is RUNNING. Arguments as for :meth:`cocoon.client.MicroVms.create`."""
        req = _api.create_microvm(
            image, vcpus=vcpus, memory_mib=memory_mib, disk_gib=disk_gib, env=env, idle_policy=idle_policy, max_runtime_seconds=max_runtime_seconds,
            egress=egress, public_endpoint=public_endpoint, app_port=app_port, metadata=metadata, volumes=volumes,
        )  # fmt: skip

        async def create() -> AsyncMicroVm:
            return AsyncMicroVm(self._http, MicroVmInfo.from_api(await self._http.json(req, self._http.config.timeout_for(request_timeout_seconds))))

        return CreatingMicroVm(create())

    async def get(self, microvm_id: str, *, request_timeout_seconds: Optional[float] = None) -> "AsyncMicroVm":
        """Describes a microVM. :raises NotFoundError: it does not exist in the key's tenant."""
        return AsyncMicroVm(self._http, MicroVmInfo.from_api(await self._http.json(_api.describe(microvm_id), self._http.config.timeout_for(request_timeout_seconds))))

    async def list(
        self, *, state: Optional[MicroVmState] = None, image: Optional[str] = None, limit: Optional[int] = None, next_token: Optional[str] = None, request_timeout_seconds: Optional[float] = None
    ) -> "AsyncMicroVmPage":
        """One page of the tenant's microVMs, newest first; pass ``next_token`` on for the next page."""
        page = await self._http.json(_api.list_microvms(state, image, limit, next_token), self._http.config.timeout_for(request_timeout_seconds))
        return AsyncMicroVmPage([AsyncMicroVm(self._http, MicroVmInfo.from_api(v)) for v in page.get("microVms", [])], page.get("nextToken"))

    async def iterate(
        self, *, state: Optional[MicroVmState] = None, image: Optional[str] = None, limit: Optional[int] = None, request_timeout_seconds: Optional[float] = None
    ) -> AsyncIterator["AsyncMicroVm"]:
        """Every microVM matching the filters, page after page."""
        next_token: Optional[str] = None
        while True:
            page = await self.list(state=state, image=image, limit=limit, next_token=next_token, request_timeout_seconds=request_timeout_seconds)
            for vm in page.microvms:
                yield vm
            next_token = page.next_token
            if not next_token:
                return

    async def suspend(self, microvm_id: str, *, request_timeout_seconds: Optional[float] = None) -> "AsyncMicroVm":
        """Suspends a RUNNING VM to disk. :raises InvalidStateError: it is not RUNNING."""
        return AsyncMicroVm(self._http, MicroVmInfo.from_api(await self._http.json(_api.suspend(microvm_id), self._http.config.timeout_for(request_timeout_seconds))))

    async def resume(self, microvm_id: str, *, request_timeout_seconds: Optional[float] = None) -> "AsyncMicroVm":
        """Resumes a SUSPENDED VM where it was. :raises InvalidStateError: it is not SUSPENDED."""
        return AsyncMicroVm(self._http, MicroVmInfo.from_api(await self._http.json(_api.resume(microvm_id), self._http.config.timeout_for(request_timeout_seconds))))

    async def fork(self, microvm_id: str, count: int = 1, *, request_timeout_seconds: Optional[float] = None) -> List["AsyncMicroVm"]:
        """Forks a RUNNING VM into ``count`` (1-16) new VMs with its memory, processes and disk of this instant, each with
        an identity of its own; the parent runs on. :raises InvalidStateError: it is not RUNNING."""
        body = await self._http.json(_api.fork(microvm_id, count), self._http.config.timeout_for(request_timeout_seconds))
        return [AsyncMicroVm(self._http, MicroVmInfo.from_api(v)) for v in body["microVms"]]

    async def snapshot(self, microvm_id: str, name: str, *, request_timeout_seconds: Optional[float] = None) -> ImageInfo:
        """Snapshots a RUNNING VM (memory and disk as they are now) into a new version of image ``name``; it runs on."""
        return ImageInfo.from_api(await self._http.json(_api.snapshot(microvm_id, name), self._http.config.timeout_for(request_timeout_seconds)))

    async def terminate(self, microvm_id: str, *, request_timeout_seconds: Optional[float] = None) -> bool:
        """Terminates a microVM. :returns: False if it does not exist (404)."""
        try:
            await self._http.json(_api.terminate(microvm_id), self._http.config.timeout_for(request_timeout_seconds))
            return True
        except NotFoundError:
            return False


class AsyncMicroVmPage:
    """One page of ``microvms.list``."""

    def __init__(self, microvms: List["AsyncMicroVm"], next_token: Optional[str]) -> None:
        self.microvms = microvms
        self.next_token = next_token

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.microvms)

    def __len__(self) -> int:
        return len(self.microvms)


class AsyncMicroVm:
    """A handle on one microVM; see :class:`cocoon.client.MicroVm`. ``async with`` terminates it on exit."""

    def __init__(self, http: AsyncTransport, info: MicroVmInfo) -> None:
        self._http = http
        self.info = info
        self.files = AsyncFiles(http, info.microvm_id)

    @property
    def id(self) -> str:
        return self.info.microvm_id

    @property
    def state(self) -> MicroVmState:
        return self.info.state

    def __repr__(self) -> str:
        return f"AsyncMicroVm({self.id!r}, state={self.state!r})"

    async def __aenter__(self) -> "AsyncMicroVm":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.terminate()

    async def refresh(self, *, request_timeout_seconds: Optional[float] = None) -> MicroVmInfo:
        self.info = MicroVmInfo.from_api(await self._http.json(_api.describe(self.id), self._http.config.timeout_for(request_timeout_seconds)))
        return self.info

    async def exec(
        self,
        command: Command,
        *,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        stdin: Optional[str] = None,
        timeout_seconds: Optional[float] = None,
        request_timeout_seconds: Optional[float] = None,
    ) -> ExecResult:
        """Runs a command and returns its whole output once it exits; see :meth:`cocoon.client.MicroVm.exec`."""
        req = _api.exec_command(self.id, command, env=env, cwd=cwd, user=user, stdin=stdin, timeout_seconds=timeout_seconds, stream=False)
        return ExecResult.from_api(await self._http.json(req, exec_timeout(timeout_seconds, request_timeout_seconds, self._http.config)))

    async def exec_stream(
        self,
        command: Command,
        *,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        stdin: Optional[str] = None,
        timeout_seconds: Optional[float] = None,
        request_timeout_seconds: Optional[float] = None,
    ) -> AsyncIterator[ExecEvent]:
        """Yields the command's output as it comes, then one ``exit`` event. Leaving
        the loop early, closing the iterator or cancelling the task kills the command."""
        req = _api.exec_command(self.id, command, env=env, cwd=cwd, user=user, stdin=stdin, timeout_seconds=timeout_seconds, stream=True)
        splitter = LineSplitter()
        chunks = self._http.stream(req, self._http.config.timeout_for(request_timeout_seconds))
        try:
            async for chunk in chunks:
                for event in _api.exec_events(splitter.feed(chunk)):
                    yield event
            for event in _api.exec_events(splitter.end()):
                yield event
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def suspend(self, *, request_timeout_seconds: Optional[float] = None) -> MicroVmInfo:
        self.info = MicroVmInfo.from_api(await self._http.json(_api.suspend(self.id), self._http.config.timeout_for(request_timeout_seconds)))
        return self.info

    async def resume(self, *, request_timeout_seconds: Optional[float] = None) -> MicroVmInfo:
        self.info = MicroVmInfo.from_api(await self._http.json(_api.resume(self.id), self._http.config.timeout_for(request_timeout_seconds)))
        return self.info

    async def fork(self, count: int = 1, *, request_timeout_seconds: Optional[float] = None) -> List["AsyncMicroVm"]:
        """Forks the VM into ``count`` new ones (see ``microvms.fork``)."""
        body = await self._http.json(_api.fork(self.id, count), self._http.config.timeout_for(request_timeout_seconds))
        return [AsyncMicroVm(self._http, MicroVmInfo.from_api(v)) for v in body["microVms"]]

    async def snapshot(self, name: str, *, request_timeout_seconds: Optional[float] = None) -> ImageInfo:
        """Snapshots the VM into a new version of image ``name`` (see ``microvms.snapshot``)."""
        return ImageInfo.from_api(await self._http.json(_api.snapshot(self.id, name), self._http.config.timeout_for(request_timeout_seconds)))

    async def terminate(self, *, request_timeout_seconds: Optional[float] = None) -> bool:
        """Terminates the VM. :returns: False if it no longer exists (404)."""
        try:
            self.info = MicroVmInfo.from_api(await self._http.json(_api.terminate(self.id), self._http.config.timeout_for(request_timeout_seconds)))
            return True
        except NotFoundError:
            return False

    async def events(self, *, request_timeout_seconds: Optional[float] = None) -> List[MicroVmEvent]:
        body = await self._http.json(_api.events(self.id), self._http.config.timeout_for(request_timeout_seconds))
        return [MicroVmEvent.from_api(e) for e in body.get("events", [])]

    async def metrics(self, *, request_timeout_seconds: Optional[float] = None) -> Metrics:
        return Metrics.from_api(await self._http.json(_api.metrics(self.id), self._http.config.timeout_for(request_timeout_seconds)))

    def logs(self, *, follow: bool = False, request_timeout_seconds: Optional[float] = None) -> AsyncIterator[str]:
        """Console and application output as text chunks; with ``follow`` until the VM ends or the iterator is closed."""
        return _text(self._http.stream(_api.logs(self.id, follow), self._http.config.timeout_for(request_timeout_seconds)))

    async def terminal(self, *, cols: int = 80, rows: int = 24, request_timeout_seconds: Optional[float] = None) -> AsyncTerminal:
        """Opens an interactive shell on a PTY (WebSocket); ``request_timeout_seconds`` bounds the handshake."""
        return await AsyncTerminal.open(self._http.config, self.id, cols, rows, self._http.config.timeout_for(request_timeout_seconds))


class AsyncFiles:
    """``vm.files``; see :class:`cocoon.client.Files`."""

    def __init__(self, http: AsyncTransport, microvm_id: str) -> None:
        self._http = http
        self._id = microvm_id

    async def read(self, path: str, *, request_timeout_seconds: Optional[float] = None) -> bytes:
        data, content_type = await self._http.bytes(_api.files("GET", self._id, path), self._http.config.timeout_for(request_timeout_seconds))
        if "application/json" in content_type:
            raise not_a_file(path)
        return data

    async def read_text(self, path: str, *, encoding: str = "utf-8", request_timeout_seconds: Optional[float] = None) -> str:
        return (await self.read(path, request_timeout_seconds=request_timeout_seconds)).decode(encoding)

    def read_stream(self, path: str, *, request_timeout_seconds: Optional[float] = None) -> AsyncIterator[bytes]:
        """A file as chunks; ``request_timeout_seconds`` bounds only the wait for the first byte."""

        def check(headers: Dict[str, str]) -> None:
            if "application/json" in headers.get("content-type", ""):
                raise not_a_file(path)

        return self._http.stream(_api.files("GET", self._id, path), self._http.config.timeout_for(request_timeout_seconds), check)

    async def write(self, path: str, data: Union[str, bytes, bytearray, memoryview, AsyncIterable[bytes]], *, request_timeout_seconds: Optional[float] = None) -> WriteInfo:
        """Writes a file atomically (parents created): text (UTF-8), bytes, or an async iterable of bytes (uploaded as it comes)."""
        body = data if hasattr(data, "__aiter__") else _api.file_body(data)  # type: ignore[arg-type]
        return WriteInfo.from_api(await self._http.json(_api.files("PUT", self._id, path, body), self._http.config.timeout_for(request_timeout_seconds)))

    async def list(self, path: str, *, request_timeout_seconds: Optional[float] = None) -> List[FileEntry]:
        data, content_type = await self._http.bytes(_api.files("GET", self._id, path), self._http.config.timeout_for(request_timeout_seconds))
        if "application/json" not in content_type:
            raise not_a_directory(path)
        return [FileEntry.from_api(e) for e in json.loads(data).get("entries", [])]

    async def remove(self, path: str, *, request_timeout_seconds: Optional[float] = None) -> None:
        await self._http.json(_api.files("DELETE", self._id, path), self._http.config.timeout_for(request_timeout_seconds))


class AsyncImages:
    """``client.images``; see :class:`cocoon.client.Images`."""

    def __init__(self, http: AsyncTransport) -> None:
        self._http = http

    async def create(
        self, name: str, dockerfile: str, *, code: Optional[_api.CodeArg] = None, code_uri: Optional[str] = None, request_timeout_seconds: Optional[float] = None
    ) -> ImageInfo:
        return ImageInfo.from_api(await self._http.json(_api.create_image(name, dockerfile, code, code_uri), self._http.config.timeout_for(request_timeout_seconds)))

    async def get(self, id_or_name: str, *, request_timeout_seconds: Optional[float] = None) -> ImageInfo:
        return ImageInfo.from_api(await self._http.json(_api.get_image(id_or_name), self._http.config.timeout_for(request_timeout_seconds)))

    async def list(self, *, request_timeout_seconds: Optional[float] = None) -> List[ImageInfo]:
        body = await self._http.json(_api.list_images(), self._http.config.timeout_for(request_timeout_seconds))
        return [ImageInfo.from_api(i) for i in body.get("images", [])]

    async def delete(self, id_or_name: str, *, force: bool = False, request_timeout_seconds: Optional[float] = None) -> None:
        await self._http.json(_api.delete_image(id_or_name, force), self._http.config.timeout_for(request_timeout_seconds))

    def build_log(self, id_or_name: str, *, follow: bool = False, request_timeout_seconds: Optional[float] = None) -> AsyncIterator[str]:
        return _text(self._http.stream(_api.build_log(id_or_name, follow), self._http.config.timeout_for(request_timeout_seconds)))

    async def wait_until_ready(self, id_or_name: str, *, poll_interval_seconds: float = 1.0, timeout_seconds: Optional[float] = None) -> ImageInfo:
        give_up = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while True:
            image = await self.get(id_or_name)
            if image.state == "READY":
                return image
            if image.state == "FAILED":
                raise _api.build_failed(image)
            if give_up is not None and time.monotonic() >= give_up:
                raise TimeoutError(f"image {id_or_name} was not READY within {timeout_seconds} s (state {image.state})", code="Timeout")
            await asyncio.sleep(poll_interval_seconds)


class AsyncVolumes:
    """``client.volumes``: persistent volumes, ext4 disks that outlive the microVMs they are attached to
    (``microvms.create(volumes=[("data", "/data")])``; a third item ``True`` attaches read-only)."""

    def __init__(self, http: AsyncTransport) -> None:
        self._http = http

    async def create(self, name: str, size_gib: int, *, request_timeout_seconds: Optional[float] = None) -> VolumeInfo:
        """Creates an empty volume (``size_gib`` 1-32). :raises ConflictError: the name is taken. :raises QuotaExceededError: past the tenant's quotas."""
        return VolumeInfo.from_api(await self._http.json(_api.create_volume(name, size_gib), self._http.config.timeout_for(request_timeout_seconds)))

    async def get(self, id_or_name: str, *, request_timeout_seconds: Optional[float] = None) -> VolumeInfo:
        """Describes a volume by id or name. :raises NotFoundError: there is none in the key's tenant."""
        return VolumeInfo.from_api(await self._http.json(_api.get_volume(id_or_name), self._http.config.timeout_for(request_timeout_seconds)))

    async def list(self, *, request_timeout_seconds: Optional[float] = None) -> List[VolumeInfo]:
        """The tenant's volumes, by name, with the microVMs holding each."""
        body = await self._http.json(_api.list_volumes(), self._http.config.timeout_for(request_timeout_seconds))
        return [VolumeInfo.from_api(v) for v in body.get("volumes", [])]

    async def delete(self, id_or_name: str, *, request_timeout_seconds: Optional[float] = None) -> None:
        """Deletes a volume and its data. :raises ConflictError: a microVM that is neither TERMINATED nor FAILED holds it."""
        await self._http.json(_api.delete_volume(id_or_name), self._http.config.timeout_for(request_timeout_seconds))


class AsyncKeys:
    """``client.keys`` (admin key only); see :class:`cocoon.client.Keys`."""

    def __init__(self, http: AsyncTransport) -> None:
        self._http = http

    async def create(self, tenant: str, permissions: Sequence[str], *, description: Optional[str] = None, request_timeout_seconds: Optional[float] = None) -> CreatedKey:
        return CreatedKey.from_api(await self._http.json(_api.create_key(tenant, permissions, description), self._http.config.timeout_for(request_timeout_seconds)))

    async def list(self, *, request_timeout_seconds: Optional[float] = None) -> List[KeyInfo]:
        body = await self._http.json(_api.list_keys(), self._http.config.timeout_for(request_timeout_seconds))
        return [KeyInfo.from_api(k) for k in body.get("keys", [])]

    async def revoke(self, key_id: str, *, request_timeout_seconds: Optional[float] = None) -> None:
        await self._http.json(_api.revoke_key(key_id), self._http.config.timeout_for(request_timeout_seconds))


class AsyncTenants:
    """``client.tenants`` (admin key only)."""

    def __init__(self, http: AsyncTransport) -> None:
        self._http = http

    async def create(self, name: str, *, request_timeout_seconds: Optional[float] = None) -> TenantInfo:
        return TenantInfo.from_api(await self._http.json(_api.create_tenant(name), self._http.config.timeout_for(request_timeout_seconds)))


async def _text(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """Byte chunks as text (UTF-8, split safely across chunk borders). Closing it closes the stream."""
    decoder = text_decoder()
    try:
        async for chunk in chunks:
            text = decoder.decode(chunk)
            if text:
                yield text
        rest = decoder.decode(b"", final=True)
        if rest:
            yield rest
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
