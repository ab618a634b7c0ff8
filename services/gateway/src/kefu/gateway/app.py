"""The gateway service: HTTP/SSE/WebSocket (aiohttp) and gRPC in front of the bus."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import grpc
from aiohttp import web
from pydantic import Field, model_validator

from kefu.gateway.agents import AgentDirectory
from kefu.gateway.auth import Auth, Origins
from kefu.gateway.core import Core
from kefu.gateway.feed import follow_reconnects
from kefu.gateway.grpc_api import start_grpc
from kefu.gateway.http import HttpApi
from kefu.gateway.ratelimit import RateLimits
from kefu.shared.audit import AuditLog
from kefu.shared.bus import Bus
from kefu.shared.config import KefuSettings, admin_token, signing_secret
from kefu.shared.crypto import Keyring
from kefu.shared.service import Service

BACKEND_SERVICES = "dialogue,retrieval,inference,plugins"


class GatewaySettings(KefuSettings):
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    # The services /readyz waits for (comma-separated).
    ready_services: str = BACKEND_SERVICES
    # Comma-separated tenants this deployment serves; empty: any well-formed tenant id.
    tenants: str = ""
    turn_timeout: float = Field(default=90.0, gt=0)
    search_timeout: float = Field(default=40.0, gt=0)
    visitor_token_ttl: float = Field(default=7 * 24 * 3600.0, gt=0)
    agent_token_ttl: float = Field(default=12 * 3600.0, gt=0)
    # Rate limits (token buckets: per_second sustained, burst at once). Messages count on HTTP, SSE, both
    # sockets and gRPC alike; "ip" is the client address (see forwarded_hops).
    rate_messages_per_second: float = Field(default=2.0, gt=0)  # per conversation
    rate_messages_burst: float = Field(default=20.0, ge=1)
    rate_ip_messages_per_second: float = Field(default=20.0, gt=0)
    rate_ip_messages_burst: float = Field(default=200.0, ge=1)
    rate_tenant_messages_per_second: float = Field(default=200.0, gt=0)
    rate_tenant_messages_burst: float = Field(default=2000.0, ge=1)
    rate_starts_per_second: float = Field(default=20.0, gt=0)  # conversation starts per client address
    rate_starts_burst: float = Field(default=200.0, ge=1)
    rate_tenant_starts_per_second: float = Field(default=100.0, gt=0)
    rate_tenant_starts_burst: float = Field(default=1000.0, ge=1)
    rate_uploads_per_second: float = Field(default=0.2, gt=0)  # images per conversation
    rate_uploads_burst: float = Field(default=10.0, ge=1)
    rate_ip_uploads_per_second: float = Field(default=1.0, gt=0)
    rate_ip_uploads_burst: float = Field(default=30.0, ge=1)
    rate_tenant_uploads_per_second: float = Field(default=20.0, gt=0)
    rate_tenant_uploads_burst: float = Field(default=200.0, ge=1)
    rate_logins_per_second: float = Field(default=1.0, gt=0)  # agent logins per client address
    rate_logins_burst: float = Field(default=20.0, ge=1)
    rate_account_logins_per_second: float = Field(default=0.2, gt=0)  # per agent account, known or not
    rate_account_logins_burst: float = Field(default=10.0, ge=1)
    # Trusted reverse proxies in front of the gateway: the client address is then taken from
    # X-Forwarded-For (0: the peer address itself).
    forwarded_hops: int = Field(default=0, ge=0, le=10)
    # Comma-separated origins a browser may open the WebSockets from ("*": any); empty: only the
    # gateway's own origin (the request's Host). Clients that send no Origin (programs) are let in.
    allowed_origins: str = ""
    grpc_grace: float = Field(default=5.0, ge=0)
    # Largest gRPC message either way (bigger: RESOURCE_EXHAUSTED); deadlines for calls that bring none.
    grpc_max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    grpc_max_call_s: float = Field(default=120.0, gt=0)
    grpc_max_stream_s: float = Field(default=3600.0, gt=0)
    # TLS for gRPC: the server's certificate and key (PEM); with _CLIENT_CA, clients must present a
    # certificate it signed (mTLS). Unset: plaintext (behind a TLS-terminating proxy or on loopback).
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None
    grpc_tls_client_ca: Path | None = None

    @model_validator(mode="after")
    def _grpc_tls_files(self) -> GatewaySettings:
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("KEFU_GRPC_TLS_CERT and KEFU_GRPC_TLS_KEY go together")
        if self.grpc_tls_client_ca is not None and self.grpc_tls_cert is None:
            raise ValueError("KEFU_GRPC_TLS_CLIENT_CA needs KEFU_GRPC_TLS_CERT and KEFU_GRPC_TLS_KEY")
        for path in (self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_client_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"no such file: {path}")
        return self


def grpc_tls(s: GatewaySettings) -> grpc.ServerCredentials | None:
    """The gRPC server's TLS credentials (requiring a client certificate when a client CA is set)."""
    if s.grpc_tls_cert is None or s.grpc_tls_key is None:
        return None
    client_ca = s.grpc_tls_client_ca.read_bytes() if s.grpc_tls_client_ca else None
    return grpc.ssl_server_credentials([(s.grpc_tls_key.read_bytes(), s.grpc_tls_cert.read_bytes())],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


class GatewayService(Service):
    name = "gateway"
    settings_class = GatewaySettings
    settings: GatewaySettings

    def __init__(self, settings: GatewaySettings | None = None) -> None:
        super().__init__(settings)
        self.http_port = 0
        self.grpc_port = 0

    async def start(self, bus: Bus, stack: AsyncExitStack) -> None:
        s = self.settings
        bus.fail_fast = True  # a visitor is told "retry" at once while NATS is out of reach (kefu.shared.bus)
        auth = Auth(admin_token(s.data_dir), signing_secret(s.data_dir), s.visitor_token_ttl)
        services = [x.strip() for x in s.ready_services.split(",") if x.strip()]
        tenants = frozenset(x.strip() for x in s.tenants.split(",") if x.strip())
        core = Core(bus, turn_timeout=s.turn_timeout, services=services, tenants=tenants,
                    search_timeout=s.search_timeout, keyring=Keyring.from_settings(bus.js, s),
                    audit=AuditLog(bus.js, s.crypto, f"gateway/{s.instance}"))
        await core.setup()
        follow_reconnects(core)  # open sockets catch up on what was published while NATS was out of reach
        agents = AgentDirectory(bus, auth, s.agent_token_ttl)
        await agents.setup()
        stack.push_async_callback(agents.close)
        limits = RateLimits(s)
        api = HttpApi(core, auth, agents=agents, limits=limits, agent_token_ttl=s.agent_token_ttl,
                      origins=Origins(s.allowed_origins), forwarded_hops=s.forwarded_hops)
        runner = web.AppRunner(api.app(), access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, s.http_host, s.http_port)
        await site.start()
        stack.push_async_callback(runner.cleanup)
        self.http_port = runner.addresses[0][1]
        server, self.grpc_port, health = await start_grpc(
            core, auth, f"{s.grpc_host}:{s.grpc_port}", limits, s.forwarded_hops,
            max_message_bytes=s.grpc_max_message_bytes, max_call_s=s.grpc_max_call_s,
            max_stream_s=s.grpc_max_stream_s, tls=grpc_tls(s))

        async def stop_grpc() -> None:
            # Health goes NOT_SERVING first so balancers stop sending; in-flight calls get a grace period.
            await health.enter_graceful_shutdown()
            await server.stop(s.grpc_grace)

        stack.push_async_callback(stop_grpc)
        self.log.info("listening", http=f"http://{s.http_host}:{self.http_port}", grpc=f"{s.grpc_host}:{self.grpc_port}")

    def health_details(self) -> dict[str, str]:
        return {"http_port": str(self.http_port), "grpc_port": str(self.grpc_port)}


