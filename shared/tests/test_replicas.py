"""KEFU_STREAM_REPLICAS on real nats-servers: a 3-node JetStream cluster keeps three copies of every stream,
KV bucket and object store kefu sets up (and scales existing ones), a single server refuses with a clear
error, and a publish rides out the loss of the stream's leader."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nats.js.api import KeyValueConfig, StreamConfig

from kefu.shared.bus import Bus, ensure_kv, ensure_object_store, ensure_stream, stream_publish
from kefu.shared.config import KefuSettings
from kefu.shared.errors import Unavailable
from kefu.shared.natsserver import NatsServer, check_sync_interval, wait_for_cluster
from kefu.shared.streams import conv_stream, media_store

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path):
    nodes = NatsServer.cluster(tmp_path, 3)
    for n in nodes:
        n.start()
    wait_for_cluster(nodes)
    yield nodes
    for n in nodes:
        n.stop()


async def _leader(bus: Bus, stream: str) -> str:
    info = await bus.js.stream_info(stream)
    assert info.cluster is not None
    return str(info.cluster.leader)


async def test_every_stream_and_bucket_gets_the_replicas_and_existing_ones_are_scaled(cluster, unique):
    urls = [n.url for n in cluster]
    plain = await Bus.connect(urls, "r1")  # what kefu did before the setting: one copy
    bus = await Bus.connect(urls, "r3", stream_replicas=3)
    try:
        old_stream, old_kv = unique("OLD"), unique("old")
        await ensure_stream(plain.js, StreamConfig(name=old_stream, subjects=[f"{old_stream}.>"]))
        await ensure_kv(plain.js, KeyValueConfig(bucket=old_kv))
        assert (await plain.js.stream_info(old_stream)).config.num_replicas == 1

        await ensure_stream(bus.js, conv_stream())
        await ensure_object_store(bus.js, media_store())
        kv = await ensure_kv(bus.js, KeyValueConfig(bucket=unique("state")))
        await ensure_stream(bus.js, StreamConfig(name=old_stream, subjects=[f"{old_stream}.>"]))
        await ensure_kv(bus.js, KeyValueConfig(bucket=old_kv))
        for stream in ("CONV", "OBJ_media", f"KV_{kv._name}", old_stream, f"KV_{old_kv}"):
            assert (await bus.js.stream_info(stream)).config.num_replicas == 3, stream
            for _ in range(100):  # a scaled stream has its new peers a moment later
                info = await bus.js.stream_info(stream)
                if info.cluster and info.cluster.leader and len(info.cluster.replicas or []) == 2:
                    break
                await asyncio.sleep(0.1)
            assert info.cluster is not None and info.cluster.leader, stream
            assert {p.name for p in info.cluster.replicas or []} | {info.cluster.leader} == {n.name for n in cluster}
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"
        # Started again (every service does at each start): nothing to change, no error.
        await ensure_stream(bus.js, conv_stream())
        await ensure_kv(bus.js, KeyValueConfig(bucket=old_kv))
    finally:
        await plain.close()
        await bus.close()


async def test_a_publish_rides_out_the_kill_of_the_stream_leader(cluster, unique):
    bus = await Bus.connect([n.url for n in cluster], "pub", stream_replicas=3)
    name = unique("S")
    try:
        await ensure_stream(bus.js, StreamConfig(name=name, subjects=[f"{name}.>"]))
        acked: list[int] = []
        for i in range(20):
            acked.append((await stream_publish(bus.js, f"{name}.x", b"%d" % i,
                                               headers={"Nats-Msg-Id": f"m{i}"})).seq)
        leader_name = await _leader(bus, name)
        leader = next(n for n in cluster if n.name == leader_name)
        leader.kill()
        for i in range(20, 40):  # the first of these waits for a new leader instead of failing
            acked.append((await stream_publish(bus.js, f"{name}.x", b"%d" % i,
                                               headers={"Nats-Msg-Id": f"m{i}"})).seq)
        assert await _leader(bus, name) != leader_name
        assert acked == list(range(1, 41))
        for seq in acked:  # nothing acknowledged is lost, in order
            assert (await bus.js.get_msg(name, seq)).data == b"%d" % (seq - 1)
    finally:
        await bus.close()


async def test_a_single_server_refuses_three_replicas_with_a_clear_error(nats_url):
    bus = await Bus.connect([nats_url], "single", stream_replicas=3)
    try:
        with pytest.raises(Unavailable) as err:
            await ensure_stream(bus.js, StreamConfig(name="R3ONONE", subjects=["r3onone.>"]))
        assert err.value.code == "stream_replicas_unavailable"
        assert "KEFU_STREAM_REPLICAS=3" in err.value.message and "cluster" in err.value.message
        with pytest.raises(Unavailable):
            await ensure_kv(bus.js, KeyValueConfig(bucket="r3onone"))
    finally:
        await bus.close()


async def test_a_publish_that_finds_no_stream_gives_up_as_unavailable(bus, unique):
    with pytest.raises(Unavailable) as err:
        await stream_publish(bus.js, f"{unique('nostream')}.x", b"", patience=0.5)
    assert err.value.code == "stream_unavailable"


def test_the_setting_is_validated():
    assert KefuSettings().stream_replicas == 1
    assert KefuSettings(stream_replicas=3).stream_replicas == 3
    env = dict(os.environ, KEFU_STREAM_REPLICAS="7")
    out = subprocess.run([sys.executable, "-c", "from kefu.shared.config import KefuSettings, load_settings; "
                          "load_settings(KefuSettings)"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "KEFU_STREAM_REPLICAS" in out.stderr, out.stderr
    assert check_sync_interval("always") == "always" and check_sync_interval("1m30s") == "1m30s"
    with pytest.raises(ValueError):
        check_sync_interval("sometimes")


async def test_sync_interval_always_reaches_the_server(tmp_path):
    with NatsServer(tmp_path / "js", sync_interval="always", monitor_port=0) as server:
        assert server.monitor("/varz")["jetstream"]["config"]["sync_always"] is True
    with NatsServer(tmp_path / "js2", monitor_port=0) as server:
        assert not server.monitor("/varz")["jetstream"]["config"].get("sync_always")
    await asyncio.sleep(0)


def test_kefu_up_refuses_replicas_its_single_embedded_server_cannot_keep(tmp_path):
    kefu = Path(sys.executable).parent / "kefu"
    env = dict(os.environ, KEFU_STREAM_REPLICAS="3")
    out = subprocess.run([str(kefu), "up", "--data-dir", str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "KEFU_STREAM_REPLICAS=3 needs a NATS cluster" in out.stdout + out.stderr
