"""Fixtures: a client of the real server named by COCOON_URL / COCOON_API_KEY (the
admin key), and one microVM shared by the sync tests of a module.

Run by test/python/python-sdk.test.ts against a `cocoon server` it starts; by hand,
from packages/python-sdk: COCOON_URL=… COCOON_API_KEY=… /usr/bin/python3 -m pytest tests -q
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from cocoon import Cocoon, IdlePolicy, MicroVm


@pytest.fixture(scope="session")
def server_url() -> str:
    url = os.environ.get("COCOON_URL")
    if not url or not os.environ.get("COCOON_API_KEY"):
        pytest.fail("set COCOON_URL and COCOON_API_KEY (an admin key) to a running Cocoon server")
    return url


@pytest.fixture(scope="session")
def client(server_url: str) -> Cocoon:
    return Cocoon()


@pytest.fixture(scope="module")
def vm(client: Cocoon) -> Iterator[MicroVm]:
    """One RUNNING VM for the module's tests (idle suspend off, so only the tests suspend it); terminated after them."""
    created = client.microvms.create("base", idle_policy=IdlePolicy(suspend_after_seconds=0), metadata={"test": "python-sdk"})
    try:
        yield created
    finally:
        created.terminate()
