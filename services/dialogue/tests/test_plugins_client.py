"""Dialogue's plugins client on a nats-server with no plugins service: turns go on without plugins and
do not ask again on every turn."""

import time

import pytest

from kefu.dialogue.plugins import Plugins
from kefu.shared.bus import Bus
from kefu.shared.natsserver import NatsServer

pytestmark = pytest.mark.integration


async def test_a_missing_plugins_service_is_remembered_for_a_while(tmp_path):
    with NatsServer(tmp_path / "js") as nats:
        bus = await Bus.connect([nats.url], "test")
        try:
            plugins = Plugins(bus)
            first = await plugins.offer("shop")
            assert first.tools == [] and first.hooks == set()
            t0 = time.perf_counter()
            again = await plugins.offer("shop")
            assert again is first and time.perf_counter() - t0 < 0.005
            assert await plugins.hook("on_message", "shop", "c1", "hi", "en", {}) == []
        finally:
            await bus.close()
