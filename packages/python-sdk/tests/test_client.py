"""The sync client against a real server with real microVMs."""

from __future__ import annotations

import builtins
import io
import socket
import uuid
import zipfile

import pytest

import cocoon
from cocoon import Cocoon, ExecEvent, MicroVm


def test_health_needs_no_key(server_url: str) -> None:
    health = Cocoon(server_url, api_key="").health()
    assert health.status == "ok"
    assert health.accelerator in ("kvm", "tcg")


def test_create_describes_the_vm(client: Cocoon, vm: MicroVm) -> None:
    assert vm.state == "RUNNING"
    assert vm.info.memory_mib == 512 and vm.info.vcpus == 1
    assert vm.info.metadata == {"test": "python-sdk"}
    assert vm.info.idle_policy.suspend_after_seconds == 0
    assert vm.info.egress == "none"
    assert vm.info.raw["microVmId"] == vm.id
    assert client.microvms.get(vm.id).info.created_at == vm.info.created_at


def test_exec_returns_exit_code_and_output(vm: MicroVm) -> None:
    result = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (7, "out\n", "err\n", False)
    assert vm.exec("echo $GREETING from $(pwd)", env={"GREETING": "hi"}, cwd="/tmp").stdout == "hi from /tmp\n"
    assert vm.exec(["tr", "a-z", "A-Z"], stdin="shout\n").stdout == "SHOUT\n"
    killed = vm.exec("sleep 30", timeout_seconds=1)
    assert killed.timed_out
    with pytest.raises(cocoon.CommandNotFoundError):
        vm.exec(["no-such-program"])


def test_exec_stream_yields_output_then_exit(vm: MicroVm) -> None:
    events = list(vm.exec_stream("echo one; echo two >&2; exit 3"))
    assert "".join(e.data for e in events if e.type == "stdout") == "one\n"
    assert "".join(e.data for e in events if e.type == "stderr") == "two\n"
    assert events[-1].type == "exit" and events[-1].exit_code == 3

    # Leaving the loop early closes the request, which kills the command.
    stream = vm.exec_stream("echo started; sleep 600")
    first = next(stream)
    assert first == ExecEvent(type="stdout", data="started\n")
    stream.close()
    assert vm.exec("for i in $(seq 50); do pgrep -x sleep >/dev/null || exit 0; sleep 0.2; done; exit 1").exit_code == 0


def test_files_round_trip(vm: MicroVm) -> None:
    data = bytes([0, 1, 2, 250, 255])
    written = vm.files.write("/tmp/py/deep/bin.dat", data)
    assert (written.path, written.size) == ("/tmp/py/deep/bin.dat", 5)
    assert vm.files.read("/tmp/py/deep/bin.dat") == data
    vm.files.write("/tmp/py/hello.txt", "héllo\n")
    assert vm.files.read_text("/tmp/py/hello.txt") == "héllo\n"
    big = b"0123456789abcdef" * 20000
    assert vm.files.write("/tmp/py/big.bin", io.BytesIO(big)).size == len(big)  # a file object is uploaded as it is read
    assert b"".join(vm.files.read_stream("/tmp/py/big.bin")) == big
    entries = {e.name: e for e in vm.files.list("/tmp/py")}
    assert sorted(entries) == ["big.bin", "deep", "hello.txt"]
    assert entries["deep"].type == "dir" and entries["hello.txt"].size == len("héllo\n".encode())

    with pytest.raises(cocoon.ValidationError) as is_dir:
        vm.files.read("/tmp/py")
    assert is_dir.value.field == "path"
    with pytest.raises(cocoon.ValidationError):
        vm.files.list("/tmp/py/hello.txt")
    vm.files.remove("/tmp/py/hello.txt")
    with pytest.raises(cocoon.NotFoundError):
        vm.files.read("/tmp/py/hello.txt")


def test_terminal_runs_a_shell(vm: MicroVm) -> None:
    with vm.terminal(cols=100, rows=30) as term:
        term.send("stty size; echo marker-$((6*7)); exit 4\n")
        output = b"".join(term).decode(errors="replace")
    assert "30 100" in output
    assert "marker-42" in output
    assert term.exit_code == 4


def test_metrics_events_and_logs(vm: MicroVm) -> None:
    metrics = vm.metrics()
    assert metrics.memory_used_mib > 0
    assert metrics.samples and metrics.samples[-1].memory_used_mib > 0
    assert vm.events()[0].type == "created"

    # What reaches the VM's console is in its logs; following them shows what comes later too.
    vm.exec("echo console-marker-1 > /dev/console")
    assert "console-marker-1" in "".join(vm.logs())
    followed = vm.logs(follow=True)
    seen = ""
    while "console-marker-1" not in seen:
        seen += next(followed)
    vm.exec("echo console-marker-2 > /dev/console")
    while "console-marker-2" not in seen:
        seen += next(followed)
    followed.close()


def test_suspend_and_resume_keep_state(client: Cocoon, vm: MicroVm) -> None:
    vm.exec("echo kept > /root/state")
    assert vm.suspend().state == "SUSPENDED"
    assert vm.state == "SUSPENDED"
    with pytest.raises(cocoon.InvalidStateError) as twice:
        vm.suspend()
    assert twice.value.status == 409 and twice.value.code == "InvalidState"
    assert client.microvms.get(vm.id).state == "SUSPENDED"
    assert vm.resume().state == "RUNNING"
    assert vm.exec("cat /root/state").stdout == "kept\n"
    (child,) = vm.fork(1)
    assert child.state == "RUNNING" and child.info.raw["forkedFrom"] == vm.id
    assert child.exec("cat /root/state").stdout == "kept\n"
    assert child.terminate()
    image = vm.snapshot("py-snap")
    assert (image.name, image.state, image.raw["version"]) == ("py-snap", "READY", 1)
    client.images.delete("py-snap")


def test_list_pages_through_vms(client: Cocoon, vm: MicroVm) -> None:
    first = client.microvms.list(limit=1)
    assert len(first) == 1
    running = [v.id for v in client.microvms.iterate(state="RUNNING", limit=1)]
    assert vm.id in running


def test_api_errors_are_typed(server_url: str, client: Cocoon) -> None:
    with pytest.raises(cocoon.NotFoundError) as missing:
        client.microvms.get("vm-does-not-exist")
    err = missing.value
    assert isinstance(err, cocoon.CocoonError)
    assert (err.code, err.status) == ("NotFound", 404)
    assert err.request_id and len(err.request_id) == 36
    assert "vm-does-not-exist" in err.message
    assert client.microvms.terminate("vm-does-not-exist") is False

    with pytest.raises(cocoon.ValidationError) as invalid:
        client.microvms.create(memory_mib=64)
    assert invalid.value.status == 400
    assert invalid.value.field and "memoryMiB" in invalid.value.field
    assert "memoryMiB" in invalid.value.message

    with pytest.raises(cocoon.UnauthorizedError):
        Cocoon(server_url, api_key="nope").microvms.list()


def test_timeouts_and_connection_failures(server_url: str, vm: MicroVm) -> None:
    with pytest.raises(cocoon.TimeoutError) as slow:
        vm.exec("sleep 5", request_timeout_seconds=0.5)
    assert isinstance(slow.value, builtins.TimeoutError)
    assert slow.value.code == "Timeout" and slow.value.status == 0

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(cocoon.ConnectionError):
        Cocoon(f"http://127.0.0.1:{port}").health()


def test_keys_and_tenants_isolate(server_url: str, client: Cocoon, vm: MicroVm) -> None:
    tenant = client.tenants.create(f"py-{uuid.uuid4().hex[:8]}")
    key = client.keys.create(tenant.name, ["microvm:*"], description="python sdk test")
    assert key.tenant_id == tenant.tenant_id and key.api_key
    assert any(k.key_id == key.key_id and k.description == "python sdk test" for k in client.keys.list())

    other = Cocoon(server_url, api_key=key.api_key)
    with pytest.raises(cocoon.NotFoundError):
        other.microvms.get(vm.id)  # another tenant's VM does not exist
    assert vm.id not in [v.id for v in other.microvms.list()]
    with pytest.raises(cocoon.ForbiddenError) as forbidden:
        other.images.list()
    assert forbidden.value.details.get("permission") == "image:read"

    client.keys.revoke(key.key_id)
    with pytest.raises(cocoon.UnauthorizedError):
        other.microvms.list()
    with pytest.raises(cocoon.ConflictError):
        client.tenants.create(tenant.name)


def test_image_from_dockerfile_and_zip(client: Cocoon) -> None:
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as z:
        z.writestr("hello.txt", "hello from the image\n")
    name = f"py-sdk-{uuid.uuid4().hex[:8]}"
    image = client.images.create(name, "FROM base\nCOPY hello.txt /srv/hello.txt\n", code=code.getvalue())
    assert image.state == "BUILDING" and image.name == name

    log = "".join(client.images.build_log(image.image_id, follow=True))
    assert "COPY hello.txt /srv/hello.txt" in log
    assert "READY" in log
    ready = client.images.wait_until_ready(name, timeout_seconds=60)
    assert ready.image_id == image.image_id and ready.ready_at
    assert name in [i.name for i in client.images.list()]

    with client.microvms.create(name) as from_image:
        assert from_image.exec("cat /srv/hello.txt").stdout == "hello from the image\n"
    assert from_image.state == "TERMINATED"

    client.images.delete(name)
    with pytest.raises(cocoon.NotFoundError):
        client.images.get(name)
    with pytest.raises(cocoon.ValidationError):
        client.images.create(name, "FROM base\n")  # neither code nor code_uri


def test_volumes_outlive_their_microvm(client: Cocoon) -> None:
    name = f"py-{uuid.uuid4().hex[:8]}"
    created = client.volumes.create(name, 1)
    assert (created.name, created.size_gib, created.state, created.attached_to) == (name, 1, "AVAILABLE", [])
    assert name in [v.name for v in client.volumes.list()]
    vm = client.microvms.create("base", volumes=[(name, "/data")])
    try:
        assert vm.exec("echo kept > /data/note && sync").exit_code == 0
        held = client.volumes.get(created.volume_id)
        assert held.state == "ATTACHED" and held.attached_to[0].microvm_id == vm.id and not held.attached_to[0].read_only
        with pytest.raises(cocoon.ConflictError):
            client.volumes.delete(name)
    finally:
        vm.terminate()
    with client.microvms.create("base", volumes=[{"name": name, "path": "/mnt/v", "readOnly": True}]) as reader:
        assert reader.files.read_text("/mnt/v/note") == "kept\n"
    client.volumes.delete(name)
    with pytest.raises(cocoon.NotFoundError):
        client.volumes.get(name)
