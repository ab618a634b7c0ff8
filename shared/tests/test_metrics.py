"""The metrics port every service serves: /metrics in the Prometheus format, /healthz that follows the
NATS connection, /readyz that follows start-up, and errors counted by service and code."""

import asyncio
import json
import urllib.error
import urllib.request
from contextlib import AsyncExitStack

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kefu.proto.bus.v1 import common_pb2
from kefu.shared import metrics
from kefu.shared.bus import Bus
from kefu.shared.config import KefuSettings, load_settings
from kefu.shared.errors import BadRequest
from kefu.shared.metrics import MetricsServer
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import Service, start_in_background


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def aget(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, url)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_server_routes_and_probes():
    state = {"healthy": False, "ready": False}
    server = MetricsServer("127.0.0.1", 0, healthy=lambda: state["healthy"], ready=lambda: state["ready"])
    collected = []

    async def collect() -> None:
        collected.append(1)

    server.on_scrape(collect)
    port = await server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        st, body = await aget(base + "/healthz")
        assert st == 503 and json.loads(body)["error"]["code"] == "unavailable"
        state["healthy"] = True
        assert (await aget(base + "/healthz"))[0] == 200
        st, body = await aget(base + "/readyz")
        assert st == 503 and json.loads(body)["error"] == {"code": "not_ready", "message": "still starting"}
        state["ready"] = True
        assert (await aget(base + "/readyz")) == (200, '{"status": "ok"}')

        metrics.declare("gateway")
        st, body = await aget(base + "/metrics")
        assert st == 200 and collected == [1]
        names = {fam.name for fam in text_string_to_metric_families(body)}
        # The process metrics come along; kefu's own families are declared before their first use.
        assert {"process_cpu_seconds", "kefu_http_requests", "kefu_ws_connections", "kefu_errors"} <= names

        st, body = await aget(base + "/nothing")
        assert st == 404 and json.loads(body)["error"]["code"] == "not_found"
        req = urllib.request.Request(base + "/metrics", method="POST", data=b"x")
        with pytest.raises(urllib.error.HTTPError) as err:
            await asyncio.to_thread(urllib.request.urlopen, req, timeout=5)
        assert err.value.code == 405

        # Garbage and a silent client do not take the server down.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x00\x01garbage\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert (await aget(base + "/healthz"))[0] == 200
    finally:
        await server.close()


class Echo(Service):
    name = "echo-test"

    async def start(self, bus: Bus, stack: AsyncExitStack) -> None:
        async def fail(_: common_pb2.HealthRequest, __: object) -> common_pb2.HealthReply:
            raise BadRequest("always", code="invalid_field")

        await bus.serve(f"kefu.test.{self.settings.instance}.fail", common_pb2.HealthRequest, fail)


async def test_service_health_follows_nats_and_errors_are_counted(tmp_path, monkeypatch):
    nats = NatsServer(tmp_path / "js").start()
    try:
        monkeypatch.setenv("KEFU_METRICS_PORT", "0")
        settings = load_settings(KefuSettings, nats_url=nats.url, instance="m1")
        svc = Echo(settings)
        stop = asyncio.Event()
        task = await start_in_background(svc, stop)
        assert svc.metrics is not None
        base = f"http://127.0.0.1:{svc.metrics.port}"
        assert (await aget(base + "/healthz"))[0] == 200
        assert (await aget(base + "/readyz"))[0] == 200

        bus = await Bus.connect([nats.url], "t")
        reply = await bus.request("kefu.health.echo-test", common_pb2.HealthRequest(), common_pb2.HealthReply)
        assert reply.details["metrics_port"] == str(svc.metrics.port)
        before = samples((await aget(base + "/metrics"))[1]).get(
            ("kefu_errors_total", (("code", "invalid_field"), ("service", "echo-test"))), 0.0)
        with pytest.raises(BadRequest):
            await bus.request("kefu.test.m1.fail", common_pb2.HealthRequest(), common_pb2.HealthReply)
        await bus.close()
        after = samples((await aget(base + "/metrics"))[1])[
            ("kefu_errors_total", (("code", "invalid_field"), ("service", "echo-test")))]
        assert after == before + 1

        nats.stop()  # the broker goes away: the liveness probe says so
        for _ in range(100):
            if (await aget(base + "/healthz"))[0] == 503:
                break
            await asyncio.sleep(0.1)
        st, body = await aget(base + "/healthz")
        assert st == 503 and "NATS" in json.loads(body)["error"]["message"]
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        nats.stop()


def test_metrics_port_setting():
    assert KefuSettings().metrics_port is None
    assert KefuSettings(metrics_port="off").metrics_port is None
    assert KefuSettings(metrics_port="9090").metrics_port == 9090
    with pytest.raises(ValueError):
        KefuSettings(metrics_port="70000")
