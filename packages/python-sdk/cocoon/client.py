"""The synchronous client. Every call takes ``request_timeout_seconds`` (the
client's default if omitted; 0 waits forever) and raises a CocoonError."""

from __future__ import annotations

import json
import time
from contextlib import closing
from typing import IO, Any, Dict, Generator, Iterator, List, Optional, Sequence, Union

from . import _api
from ._http import Config, LineSplitter, exec_timeout, not_a_directory, not_a_file, text_decoder
from ._sync_http import SyncTransport
from ._terminal import Terminal
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


class Cocoon:
    """A client of one Cocoon server. Stateless apart from its options (one
    connection per call), so one client may be shared across threads.

    >>> client = Cocoon()                   # COCOON_URL, COCOON_API_KEY
    >>> with client.microvms.create(memory_mib=1024) as vm:
    ...     print(vm.exec(["python3", "-c", "print(1)"]).stdout)
    """

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *, request_timeout_seconds: Optional[float] = None) -> None:
        """
        :param base_url: the server, default ``COCOON_URL``, else ``http://127.0.0.1:7070``.
        :param api_key: sent as ``Authorization: Bearer``, default ``COCOON_API_KEY``.
        :param request_timeout_seconds: default limit of every call, 120; 0 waits forever.
            Creating a VM waits until it runs, so keep this well above a launch time.
        """
        self._http = SyncTransport(Config.make(base_url, api_key, request_timeout_seconds))
        self.microvms = MicroVms(self._http)
        """MicroVMs: create, get, list, suspend, resume, terminate; exec, files and more on the returned handle."""
        self.images = Images(self._http)
        """Images built from a Dockerfile and code."""
        self.volumes = Volumes(self._http)
        """Persistent volumes, attached at a microVM's create."""
        self.keys = Keys(self._http)
        """API keys (admin key only)."""
        self.tenants = Tenants(self._http)
        """Tenants (admin key only)."""

    @property
    def base_url(self) -> str:
        return self._http.config.base_url

    def health(self, *, request_timeout_seconds: Optional[float] = None) -> Health:
        """``GET /v1/health`` (no key needed): status, accelerator (``kvm`` or ``tcg``) and version."""
        return Health.from_api(self._http.json(_api.health(), self._http.config.timeout_for(request_timeout_seconds)))


class MicroVms:
    """``client.microvms``: create, find and change microVMs. Each call also exists on the :class:`MicroVm` handle."""

    def __init__(self, http: SyncTransport) -> None:
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
    ) -> "MicroVm":
        """Creates a microVM and returns once it is RUNNING. Unset arguments take the
        server's defaults: 1 vCPU, 512 MiB, the image's disk, idle suspend after 900 s
        with auto-resume, 8 h runtime, egress ``"none"``.

        :param egress: ``"none"``, ``"internet"``, or an allow-list of CIDRs and host names.
        :raises ValidationError: a field out of range (``err.field`` names it).
        :raises NotFoundError: an unknown image.
        :raises CapacityExceededError: the host is full.
        """
        req = _api.create_microvm(
            image, vcpus=vcpus, memory_mib=memory_mib, disk_gib=disk_gib, env=env, idle_policy=idle_policy, max_runtime_seconds=max_runtime_seconds,
            egress=egress, public_endpoint=public_endpoint, app_port=app_port, metadata=metadata, volumes=volumes,
        )  # fmt: skip
        return MicroVm(self._http, MicroVmInfo.from_api(self._http.json(req, self._http.config.timeout_for(request_timeout_seconds))))

    def get(self, microvm_id: str, *, request_timeout_seconds: Optional[float] = None) -> "MicroVm":
        """Describes a microVM. :raises NotFoundError: it does not exist in the key's tenant."""
        return MicroVm(self._http, self._describe(microvm_id, request_timeout_seconds))

    def list(
        self, *, state: Optional[MicroVmState] = None, image: Optional[str] = None, limit: Optional[int] = None, next_token: Optional[str] = None, request_timeout_seconds: Optional[float] = None
    ) -> "MicroVmPage":
        """One page (default 100, at most 1000) of the tenant's microVMs, terminated ones included, newest first; pass ``next_token`` on for the next page."""
        page = self._http.json(_api.list_microvms(state, image, limit, next_token), self._http.config.timeout_for(request_timeout_seconds))
        return MicroVmPage([MicroVm(self._http, MicroVmInfo.from_api(v)) for v in page.get("microVms", [])], page.get("nextToken"))

    def iterate(self, *, state: Optional[MicroVmState] = None, image: Optional[str] = None, limit: Optional[int] = None, request_timeout_seconds: Optional[float] = None) -> Iterator["MicroVm"]:
        """Every microVM matching the filters, page after page."""
        next_token: Optional[str] = None
        while True:
            page = self.list(state=state, image=image, limit=limit, next_token=next_token, request_timeout_seconds=request_timeout_seconds)
            yield from page.microvms
            next_token = page.next_token
            if not next_token:
                return

    def suspend(self, microvm_id: str, *, request_timeout_seconds: Optional[float] = None) -> "MicroVm":
        """Suspends a RUNNING VM to disk (no CPU or memory held). :raises InvalidStateError: it is not RUNNING."""
        return MicroVm(self._http, MicroVmInfo.from_api(self._http.json(_api.suspend(microvm_id), self._http.config.timeout_for(request_timeout_seconds))))

    def resume(self, microvm_id: str, *, request_timeout_seconds: Optional[float] = None) -> "MicroVm":
        """Resumes a SUSPENDED VM exactly where it was. :raises InvalidStateError: it is not SUSPENDED."""
        return MicroVm(self._http, MicroVmInfo.from_api(self._http.json(_api.resume(microvm_id), self._http.config.timeout_for(request_timeout_seconds))))

    def fork(self, microvm_id: str, count: int = 1, *, request_timeout_seconds: Optional[float] = None) -> List["MicroVm"]:
        """Forks a RUNNING VM into ``count`` (1-16) new VMs with its memory, processes and disk of this instant, each with
        an identity of its own; the parent runs on. :raises InvalidStateError: it is not RUNNING."""
        body = self._http.json(_api.fork(microvm_id, count), self._http.config.timeout_for(request_timeout_seconds))
        return [MicroVm(self._http, MicroVmInfo.from_api(v)) for v in body["microVms"]]

    def snapshot(self, microvm_id: str, name: str, *, request_timeout_seconds: Optional[float] = None) -> ImageInfo:
        """Snapshots a RUNNING VM (memory and disk as they are now) into a new version of image ``name``; it runs on."""
        return ImageInfo.from_api(self._http.json(_api.snapshot(microvm_id, name), self._http.config.timeout_for(request_timeout_seconds)))

    def terminate(self, microvm_id: str, *, request_timeout_seconds: Optional[float] = None) -> bool:
        """Terminates a microVM (its files are removed; it stays listed as TERMINATED).
        :returns: True if it was terminated, False if it does not exist (404)."""
        try:
            self._http.json(_api.terminate(microvm_id), self._http.config.timeout_for(request_timeout_seconds))
            return True
        except NotFoundError:
            return False

    def _describe(self, microvm_id: str, request_timeout_seconds: Optional[float]) -> MicroVmInfo:
        return MicroVmInfo.from_api(self._http.json(_api.describe(microvm_id), self._http.config.timeout_for(request_timeout_seconds)))


class MicroVmPage:
    """One page of ``microvms.list``."""

    def __init__(self, microvms: List["MicroVm"], next_token: Optional[str]) -> None:
        self.microvms = microvms
        self.next_token = next_token
        """Pass to ``list(next_token=…)`` for the next page; None on the last."""

    def __iter__(self) -> Iterator["MicroVm"]:
        return iter(self.microvms)

    def __len__(self) -> int:
        return len(self.microvms)


class MicroVm:
    """A handle on one microVM, returned by ``microvms.create/get/list``. ``info`` is
    the description as of the last call that returned it; ``refresh()`` reloads it.
    As a context manager it terminates the VM on exit."""

    def __init__(self, http: SyncTransport, info: MicroVmInfo) -> None:
        self._http = http
        self.info = info
        self.files = Files(http, info.microvm_id)
        """Files in the VM. Needs it RUNNING (or SUSPENDED with auto-resume)."""

    @property
    def id(self) -> str:
        return self.info.microvm_id

    @property
    def state(self) -> MicroVmState:
        """The state as of the last call that described the VM."""
        return self.info.state

    def __repr__(self) -> str:
        return f"MicroVm({self.id!r}, state={self.state!r})"

    def __enter__(self) -> "MicroVm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def refresh(self, *, request_timeout_seconds: Optional[float] = None) -> MicroVmInfo:
        """Reloads ``info`` from the server."""
        self.info = MicroVmInfo.from_api(self._http.json(_api.describe(self.id), self._http.config.timeout_for(request_timeout_seconds)))
        return self.info

    def exec(
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
        """Runs a command and returns its whole output once it exits. A non-zero exit
        is a result, not an error. A SUSPENDED VM with auto-resume is resumed first.

        :param command: argv (run as is) or a string (run through ``/bin/sh -c``).
        :param stdin: text written to the command's standard input, then closed; at most 512 KiB.
        :param timeout_seconds: the command is killed after this long (default 60); the result then has ``timed_out``.
        :param request_timeout_seconds: the HTTP call's limit; default the client's, stretched to ``timeout_seconds`` + 30 s.
        :raises CommandNotFoundError: the program does not exist in the VM.
        """
        req = _api.exec_command(self.id, command, env=env, cwd=cwd, user=user, stdin=stdin, timeout_seconds=timeout_seconds, stream=False)
        return ExecResult.from_api(self._http.json(req, exec_timeout(timeout_seconds, request_timeout_seconds, self._http.config)))

    def exec_stream(
        self,
        command: Command,
        *,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        stdin: Optional[str] = None,
        timeout_seconds: Optional[float] = None,
        request_timeout_seconds: Optional[float] = None,
    ) -> Iterator[ExecEvent]:
        """Runs a command and yields its output as it comes, ending with one ``exit``
        event. Leaving the loop early (or closing the iterator) closes the request,
        which kills the command. ``request_timeout_seconds`` bounds only the wait for
        the command to start."""
        req = _api.exec_command(self.id, command, env=env, cwd=cwd, user=user, stdin=stdin, timeout_seconds=timeout_seconds, stream=True)
        splitter = LineSplitter()
        with closing(self._http.stream(req, self._http.config.timeout_for(request_timeout_seconds))) as chunks:
            for chunk in chunks:
                yield from _api.exec_events(splitter.feed(chunk))
            yield from _api.exec_events(splitter.end())

    def suspend(self, *, request_timeout_seconds: Optional[float] = None) -> MicroVmInfo:
        """Suspends the VM to disk; ``info`` is updated. :raises InvalidStateError: it is not RUNNING."""
        self.info = MicroVmInfo.from_api(self._http.json(_api.suspend(self.id), self._http.config.timeout_for(request_timeout_seconds)))
        return self.info

    def resume(self, *, request_timeout_seconds: Optional[float] = None) -> MicroVmInfo:
        """Resumes the VM where it was; ``info`` is updated. :raises InvalidStateError: it is not SUSPENDED."""
        self.info = MicroVmInfo.from_api(self._http.json(_api.resume(self.id), self._http.config.timeout_for(request_timeout_seconds)))
        return self.info

    def fork(self, count: int = 1, *, request_timeout_seconds: Optional[float] = None) -> List["MicroVm"]:
        """Forks the VM into ``count`` new ones (see ``microvms.fork``)."""
        body = self._http.json(_api.fork(self.id, count), self._http.config.timeout_for(request_timeout_seconds))
        return [MicroVm(self._http, MicroVmInfo.from_api(v)) for v in body["microVms"]]

    def snapshot(self, name: str, *, request_timeout_seconds: Optional[float] = None) -> ImageInfo:
        """Snapshots the VM into a new version of image ``name`` (see ``microvms.snapshot``)."""
        return ImageInfo.from_api(self._http.json(_api.snapshot(self.id, name), self._http.config.timeout_for(request_timeout_seconds)))

    def terminate(self, *, request_timeout_seconds: Optional[float] = None) -> bool:
        """Terminates the VM. :returns: False if it no longer exists (404), True otherwise."""
        try:
            self.info = MicroVmInfo.from_api(self._http.json(_api.terminate(self.id), self._http.config.timeout_for(request_timeout_seconds)))
            return True
        except NotFoundError:
            return False

    def events(self, *, request_timeout_seconds: Optional[float] = None) -> List[MicroVmEvent]:
        """The VM's lifecycle events, oldest first: created, suspended (idle), resumed (request), terminated (max runtime), …"""
        body = self._http.json(_api.events(self.id), self._http.config.timeout_for(request_timeout_seconds))
        return [MicroVmEvent.from_api(e) for e in body.get("events", [])]

    def metrics(self, *, request_timeout_seconds: Optional[float] = None) -> Metrics:
        """CPU, memory, disk and network now (read from the guest when RUNNING) and the recent samples."""
        return Metrics.from_api(self._http.json(_api.metrics(self.id), self._http.config.timeout_for(request_timeout_seconds)))

    def logs(self, *, follow: bool = False, request_timeout_seconds: Optional[float] = None) -> Iterator[str]:
        """Console and application output as text chunks; with ``follow`` it goes on
        until the VM ends or the iterator is closed. ``request_timeout_seconds``
        bounds only the wait for the response to start."""
        return _text(self._http.stream(_api.logs(self.id, follow), self._http.config.timeout_for(request_timeout_seconds)))

    def terminal(self, *, cols: int = 80, rows: int = 24, request_timeout_seconds: Optional[float] = None) -> Terminal:
        """Opens an interactive shell on a PTY (WebSocket). A SUSPENDED VM is resumed first.
        ``request_timeout_seconds`` bounds the opening handshake."""
        return Terminal.open(self._http.config, self.id, cols, rows, self._http.config.timeout_for(request_timeout_seconds))


class Files:
    """``vm.files``: read, write, list and remove files in the VM. Paths are absolute; every call counts as activity."""

    def __init__(self, http: SyncTransport, microvm_id: str) -> None:
        self._http = http
        self._id = microvm_id

    def read(self, path: str, *, request_timeout_seconds: Optional[float] = None) -> bytes:
        """A file's bytes. :raises NotFoundError: it does not exist. :raises ValidationError: it is a directory (use ``list``)."""
        data, content_type = self._http.bytes(_api.files("GET", self._id, path), self._http.config.timeout_for(request_timeout_seconds))
        if "application/json" in content_type:
            raise not_a_file(path)
        return data

    def read_text(self, path: str, *, encoding: str = "utf-8", request_timeout_seconds: Optional[float] = None) -> str:
        """A file's content decoded as text."""
        return self.read(path, request_timeout_seconds=request_timeout_seconds).decode(encoding)

    def read_stream(self, path: str, *, request_timeout_seconds: Optional[float] = None) -> Iterator[bytes]:
        """A file as chunks, for large files; ``request_timeout_seconds`` bounds only the wait for the first byte."""

        def check(headers: Dict[str, str]) -> None:
            if "application/json" in headers.get("content-type", ""):
                raise not_a_file(path)

        return self._http.stream(_api.files("GET", self._id, path), self._http.config.timeout_for(request_timeout_seconds), check)

    def write(self, path: str, data: Union[str, bytes, bytearray, memoryview, IO[bytes]], *, request_timeout_seconds: Optional[float] = None) -> WriteInfo:
        """Writes a file, replacing it atomically; missing parent directories are
        created. ``data`` is text (written as UTF-8), bytes, or a binary file object
        (uploaded as it is read)."""
        body = data if hasattr(data, "read") else _api.file_body(data)  # type: ignore[arg-type]
        return WriteInfo.from_api(self._http.json(_api.files("PUT", self._id, path, body), self._http.config.timeout_for(request_timeout_seconds)))

    def list(self, path: str, *, request_timeout_seconds: Optional[float] = None) -> List[FileEntry]:
        """A directory's entries. :raises NotFoundError: it does not exist. :raises ValidationError: it is a file."""
        data, content_type = self._http.bytes(_api.files("GET", self._id, path), self._http.config.timeout_for(request_timeout_seconds))
        if "application/json" not in content_type:
            raise not_a_directory(path)
        return [FileEntry.from_api(e) for e in json.loads(data).get("entries", [])]

    def remove(self, path: str, *, request_timeout_seconds: Optional[float] = None) -> None:
        """Removes a file, or a directory with everything in it. :raises NotFoundError: it does not exist."""
        self._http.json(_api.files("DELETE", self._id, path), self._http.config.timeout_for(request_timeout_seconds))


class Images:
    """``client.images``: build images from a Dockerfile and code, and find them."""

    def __init__(self, http: SyncTransport) -> None:
        self._http = http

    def create(
        self, name: str, dockerfile: str, *, code: Optional[_api.CodeArg] = None, code_uri: Optional[str] = None, request_timeout_seconds: Optional[float] = None
    ) -> ImageInfo:
        """Starts building an image; returns at once with state BUILDING. Follow it with
        ``build_log(id, follow=True)`` or ``wait_until_ready(id)``.

        :param code: the build context as a .zip: its bytes or the path of a .zip file (uploaded as multipart).
        :param code_uri: instead of ``code``: ``s3://bucket/key``, ``https://…`` or ``file://…`` (server-local, admin only).
        """
        return ImageInfo.from_api(self._http.json(_api.create_image(name, dockerfile, code, code_uri), self._http.config.timeout_for(request_timeout_seconds)))

    def get(self, id_or_name: str, *, request_timeout_seconds: Optional[float] = None) -> ImageInfo:
        """Describes an image by id or name. :raises NotFoundError: there is none."""
        return ImageInfo.from_api(self._http.json(_api.get_image(id_or_name), self._http.config.timeout_for(request_timeout_seconds)))

    def list(self, *, request_timeout_seconds: Optional[float] = None) -> List[ImageInfo]:
        """The tenant's images, the built-in ``base`` included."""
        body = self._http.json(_api.list_images(), self._http.config.timeout_for(request_timeout_seconds))
        return [ImageInfo.from_api(i) for i in body.get("images", [])]

    def delete(self, id_or_name: str, *, force: bool = False, request_timeout_seconds: Optional[float] = None) -> None:
        """Deletes an image. :raises ConflictError: microVMs still use it, unless ``force``."""
        self._http.json(_api.delete_image(id_or_name, force), self._http.config.timeout_for(request_timeout_seconds))

    def build_log(self, id_or_name: str, *, follow: bool = False, request_timeout_seconds: Optional[float] = None) -> Iterator[str]:
        """The build output as text chunks; with ``follow`` until the build ends."""
        return _text(self._http.stream(_api.build_log(id_or_name, follow), self._http.config.timeout_for(request_timeout_seconds)))

    def wait_until_ready(self, id_or_name: str, *, poll_interval_seconds: float = 1.0, timeout_seconds: Optional[float] = None) -> ImageInfo:
        """Polls until the image is READY and returns it.

        :param timeout_seconds: give up after this long with a TimeoutError (None: never).
        :raises CocoonError: code ``ImageBuildFailed`` if the build fails.
        """
        give_up = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while True:
            image = self.get(id_or_name)
            if image.state == "READY":
                return image
            if image.state == "FAILED":
                raise _api.build_failed(image)
            if give_up is not None and time.monotonic() >= give_up:
                raise TimeoutError(f"image {id_or_name} was not READY within {timeout_seconds} s (state {image.state})", code="Timeout")
            time.sleep(poll_interval_seconds)


class Volumes:
    """``client.volumes``: persistent volumes, ext4 disks that outlive the microVMs they are attached to
    (``microvms.create(volumes=[("data", "/data")])``; a third item ``True`` attaches read-only)."""

    def __init__(self, http: SyncTransport) -> None:
        self._http = http

    def create(self, name: str, size_gib: int, *, request_timeout_seconds: Optional[float] = None) -> VolumeInfo:
        """Creates an empty volume (``size_gib`` 1-32). :raises ConflictError: the name is taken. :raises QuotaExceededError: past the tenant's quotas."""
        return VolumeInfo.from_api(self._http.json(_api.create_volume(name, size_gib), self._http.config.timeout_for(request_timeout_seconds)))

    def get(self, id_or_name: str, *, request_timeout_seconds: Optional[float] = None) -> VolumeInfo:
        """Describes a volume by id or name. :raises NotFoundError: there is none in the key's tenant."""
        return VolumeInfo.from_api(self._http.json(_api.get_volume(id_or_name), self._http.config.timeout_for(request_timeout_seconds)))

    def list(self, *, request_timeout_seconds: Optional[float] = None) -> List[VolumeInfo]:
        """The tenant's volumes, by name, with the microVMs holding each."""
        body = self._http.json(_api.list_volumes(), self._http.config.timeout_for(request_timeout_seconds))
        return [VolumeInfo.from_api(v) for v in body.get("volumes", [])]

    def delete(self, id_or_name: str, *, request_timeout_seconds: Optional[float] = None) -> None:
        """Deletes a volume and its data. :raises ConflictError: a microVM that is neither TERMINATED nor FAILED holds it."""
        self._http.json(_api.delete_volume(id_or_name), self._http.config.timeout_for(request_timeout_seconds))


class Keys:
    """``client.keys`` (admin key only): API keys of every tenant."""

    def __init__(self, http: SyncTransport) -> None:
        self._http = http

    def create(self, tenant: str, permissions: Sequence[str], *, description: Optional[str] = None, request_timeout_seconds: Optional[float] = None) -> CreatedKey:
        """Creates a key for a tenant (id or name); ``api_key``, the secret, is returned this once.
        :raises NotFoundError: an unknown tenant."""
        return CreatedKey.from_api(self._http.json(_api.create_key(tenant, permissions, description), self._http.config.timeout_for(request_timeout_seconds)))

    def list(self, *, request_timeout_seconds: Optional[float] = None) -> List[KeyInfo]:
        """All keys, revoked ones included (with ``revoked_at``); never their secrets."""
        return [KeyInfo.from_api(k) for k in self._http.json(_api.list_keys(), self._http.config.timeout_for(request_timeout_seconds)).get("keys", [])]

    def revoke(self, key_id: str, *, request_timeout_seconds: Optional[float] = None) -> None:
        """Revokes a key; effective on the next request made with it. :raises NotFoundError: an unknown key."""
        self._http.json(_api.revoke_key(key_id), self._http.config.timeout_for(request_timeout_seconds))


class Tenants:
    """``client.tenants`` (admin key only)."""

    def __init__(self, http: SyncTransport) -> None:
        self._http = http

    def create(self, name: str, *, request_timeout_seconds: Optional[float] = None) -> TenantInfo:
        """Creates a tenant; names are 1–64 of ``A-Za-z0-9._-``. :raises ConflictError: the name is taken."""
        return TenantInfo.from_api(self._http.json(_api.create_tenant(name), self._http.config.timeout_for(request_timeout_seconds)))


def _text(chunks: Generator[bytes, None, None]) -> Iterator[str]:
    """Byte chunks as text (UTF-8, split safely across chunk borders). Closing it closes the stream."""
    decoder = text_decoder()
    with closing(chunks):
        for chunk in chunks:
            text = decoder.decode(chunk)
            if text:
                yield text
        rest = decoder.decode(b"", final=True)
        if rest:
            yield rest
