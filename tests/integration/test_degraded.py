"""A gateway whose services are down, or whose clients flood it: typed answers, never a hang."""

import asyncio

import aiohttp
import pytest

from kefu.gateway.app import GatewayService, GatewaySettings
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import start_in_background

pytestmark = pytest.mark.integration


async def run_gateway(nats_url, data_dir, **overrides):
    svc = GatewayService(GatewaySettings(nats_url=nats_url, data_dir=data_dir, http_port=0, grpc_port=0,
                                         log_level="warning", **overrides))
    stop = asyncio.Event()
    return svc, stop, await start_in_background(svc, stop)


async def test_services_down_means_503_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("KEFU_ADMIN_TOKEN", "admin-for-degraded-test")
    with NatsServer(tmp_path / "js") as lonely:
        svc, stop, task = await run_gateway(lonely.url, tmp_path, turn_timeout=5)
        base = f"http://127.0.0.1:{svc.http_port}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                async with s.get(base + "/readyz") as r:
                    body = await r.json()
                    assert r.status == 503 and body["services"]["dialogue"] == "not running"
                    assert body["error"]["code"] == "unavailable"
                async with s.get(base + "/v1/tenants/t/search?q=x",
                                 headers={"Authorization": "Bearer admin-for-degraded-test"}) as r:
                    assert r.status == 503 and (await r.json())["error"]["code"] == "service_unavailable"
                async with s.post(base + "/v1/tenants/t/conversations", json={}) as r:
                    assert r.status == 503
                # The document store itself (JetStream) still accepts writes while retrieval is down.
                async with s.put(base + "/v1/tenants/t/documents/d", json={"title": "t", "text": "kept"},
                                 headers={"Authorization": "Bearer admin-for-degraded-test"}) as r:
                    assert r.status == 200 and (await r.json())["version"] == 1
        finally:
            stop.set()
            await task


async def test_flood_gets_429_with_retry_after(nats_url, tmp_path, monkeypatch):
    monkeypatch.setenv("KEFU_ADMIN_TOKEN", "admin-for-flood-test")
    svc, stop, task = await run_gateway(nats_url, tmp_path, rate_starts_per_second=0.5, rate_starts_burst=2)
    base = f"http://127.0.0.1:{svc.http_port}"
    try:
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(4):
                async with s.post(base + "/v1/tenants/flood/conversations", json={}) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert int(r.headers["Retry-After"]) >= 1
                        assert (await r.json())["error"]["code"] == "rate_limited"
            assert statuses[-1] == 429 and 429 not in statuses[:2]
    finally:
        stop.set()
        await task


async def test_only_configured_tenants_are_served(nats_url, tmp_path, monkeypatch):
    monkeypatch.setenv("KEFU_ADMIN_TOKEN", "admin-for-tenant-test")
    svc, stop, task = await run_gateway(nats_url, tmp_path, tenants="acme, globex")
    base = f"http://127.0.0.1:{svc.http_port}"
    admin = {"Authorization": "Bearer admin-for-tenant-test"}
    try:
        async with aiohttp.ClientSession() as s:
            for method, path, body in (("POST", "/v1/tenants/initech/conversations", {}),
                                       ("PUT", "/v1/tenants/initech/documents/d", {"text": "x"}),
                                       ("GET", "/v1/tenants/initech/search?q=x", None)):
                async with s.request(method, base + path, json=body, headers=admin) as r:
                    assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_tenant", path
            async with s.put(base + "/v1/tenants/acme/documents/d", json={"text": "served"}, headers=admin) as r:
                assert r.status == 200
    finally:
        stop.set()
        await task
