"""The asyncio client against a real server: one VM for all of it."""

from __future__ import annotations

import asyncio

import pytest

import cocoon
from cocoon import AsyncCocoon

# Waits up to 10 s for no `sleep` process to be left in the VM.
NO_SLEEP_LEFT = "for i in $(seq 50); do pgrep -x sleep >/dev/null || exit 0; sleep 0.2; done; exit 1"


def test_async_client(server_url: str) -> None:
    asyncio.run(_async_client())


async def _async_client() -> None:
    client = AsyncCocoon()
    assert (await client.health()).status == "ok"
    async with client.microvms.create(idle_policy={"suspendAfterSeconds": 0}, env={"WHO": "async"}) as vm:
        assert vm.state == "RUNNING"
        result = await vm.exec("echo $WHO; echo err >&2; exit 2")
        assert (result.exit_code, result.stdout, result.stderr) == (2, "async\n", "err\n")

        events = [e async for e in vm.exec_stream(["sh", "-c", "echo a; echo b >&2"])]
        # Each stream keeps its order; the two pipes are read at once, so either may come first.
        assert sorted((e.type, e.data) for e in events[:-1]) == [("stderr", "b\n"), ("stdout", "a\n")]
        assert events[-1].exit_code == 0

        assert (await vm.files.write("/tmp/a/b.txt", "héllo")).size == 6
        assert await vm.files.read_text("/tmp/a/b.txt") == "héllo"
        assert [e.name for e in await vm.files.list("/tmp/a")] == ["b.txt"]

        async def pieces():
            for part in (b"one ", b"two ", b"three"):
                yield part

        assert (await vm.files.write("/tmp/a/chunked.txt", pieces())).size == 13
        assert b"".join([c async for c in vm.files.read_stream("/tmp/a/chunked.txt")]) == b"one two three"

        # Cancelling the task that awaits exec closes the request, and the server kills the command.
        running = asyncio.ensure_future(vm.exec("sleep 600"))
        await asyncio.sleep(0.5)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert (await vm.exec(NO_SLEEP_LEFT)).exit_code == 0

        with pytest.raises(cocoon.TimeoutError):
            await vm.exec("sleep 5", request_timeout_seconds=0.5)
        assert (await vm.exec(NO_SLEEP_LEFT)).exit_code == 0

        async with await vm.terminal() as term:
            await term.send("echo marker-$((6*7)); exit 3\n")
            output = b"".join([chunk async for chunk in term])
        assert b"marker-42" in output and term.exit_code == 3

        assert (await vm.suspend()).state == "SUSPENDED"
        assert (await vm.resume()).state == "RUNNING"
        assert vm.id in [v.id async for v in client.microvms.iterate(state="RUNNING")]
        assert (await vm.metrics()).memory_used_mib > 0
    assert vm.state == "TERMINATED"
    assert await client.microvms.terminate("vm-does-not-exist") is False
    with pytest.raises(cocoon.NotFoundError):
        await client.microvms.get(vm.id + "x")
    with pytest.raises(cocoon.ValidationError):
        await client.microvms.create(vcpus=0)
