"""The one HTTP client plugins call out with (CRM webhooks, payment APIs), safe against SSRF.

Every request must name a host on the allow-list (``KEFU_PLUGINS_ALLOWED_HOSTS``: ``crm.internal``,
``*.corp.example``, ``10.0.0.5:8443``). The name is resolved once, every address it resolves to is
checked, and the connection goes to exactly those addresses — so a DNS answer that changes between
check and connect (rebinding) cannot reach anything else. Private, loopback, link-local (the cloud
metadata address 169.254.169.254 among them), multicast and reserved addresses are refused unless a
network in ``KEFU_PLUGINS_ALLOWED_NETWORKS`` holds them. Redirects are not followed; responses are
capped in size and time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from kefu.shared.errors import KefuError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_RESPONSE_BYTES = 1024 * 1024


class OutboundRefused(KefuError):
    """A plugin asked for a URL the outbound policy does not allow."""

    code = "outbound_refused"
    http_status = 403


class OutboundFailed(KefuError):
    """The remote host could not be reached, timed out, or answered with something unusable."""

    code = "outbound_failed"
    http_status = 502


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise OutboundFailed(f"the answer (HTTP {self.status}) is not JSON") from None


def _public(ip: IPAddress) -> bool:
    """A globally routable unicast address (not private, loopback, link-local, shared, reserved...)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class OutboundPolicy:
    """Which hosts and addresses plugins may reach."""

    def __init__(self, allowed_hosts: list[str], allowed_networks: list[str] | None = None) -> None:
        self.hosts = [h.strip().lower() for h in allowed_hosts if h.strip()]
        try:
            self.networks: list[IPNetwork] = [ipaddress.ip_network(n.strip(), strict=False)
                                              for n in (allowed_networks or []) if n.strip()]
        except ValueError as exc:
            raise ValueError(f"KEFU_PLUGINS_ALLOWED_NETWORKS: {exc}") from None

    def check_url(self, url: str) -> tuple[str, str, int]:
        """(scheme, host, port) of ``url`` if its host is on the allow-list.

        Raises:
            OutboundRefused: not http(s), credentials in the URL, or a host not allowed.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise OutboundRefused("the URL cannot be parsed") from None
        if parts.scheme not in ("http", "https"):
            raise OutboundRefused("only http and https URLs may be called")
        if parts.username or parts.password:
            raise OutboundRefused("URLs with credentials are refused (send them as headers)")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise OutboundRefused("the URL has no host")
        port = port or (443 if parts.scheme == "https" else 80)
        if not self._host_allowed(host, port):
            raise OutboundRefused(f"host {host!r} is not on the outbound allow-list (KEFU_PLUGINS_ALLOWED_HOSTS)")
        return parts.scheme, host, port

    def _host_allowed(self, host: str, port: int) -> bool:
        for entry in self.hosts:
            name, _, want_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            if want_port and want_port != str(port):
                continue
            if entry == "*" or name == host or (name.startswith("*.") and host.endswith(name[1:])):
                return True
        return False

    def check_address(self, ip: IPAddress) -> None:
        """Raises OutboundRefused for a non-public address outside the allowed networks."""
        if any(ip in net for net in self.networks):
            return
        if not _public(ip):
            raise OutboundRefused(f"address {ip} is private, loopback, link-local or reserved "
                                  "(allow it with KEFU_PLUGINS_ALLOWED_NETWORKS)")


class _CheckedResolver(AbstractResolver):
    """Resolves as usual, then keeps only the addresses the policy allows (refusing if none are)."""

    def __init__(self, policy: OutboundPolicy) -> None:
        self.policy = policy

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[ResolveResult]:
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            infos = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))]
        else:
            try:
                found = await asyncio.get_running_loop().getaddrinfo(host, port, family=family,
                                                                     type=socket.SOCK_STREAM)
            except OSError as exc:
                raise OutboundFailed(f"cannot resolve {host!r}: {exc}") from None
            infos = [(fam, str(addr[0])) for fam, _, _, _, addr in found]
        results: list[ResolveResult] = []
        for fam, addr in infos:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
            self.policy.check_address(ip)  # any refused address refuses the host: no partial trust
            results.append(ResolveResult(hostname=host, host=addr, port=port, family=fam, proto=0,
                                         flags=socket.AI_NUMERICHOST))
        if not results:
            raise OutboundFailed(f"{host!r} has no address")
        return results

    async def close(self) -> None:
        return None


class OutboundHTTP:
    """``await http.get(url)`` / ``await http.post(url, json=...)`` under the outbound policy."""

    def __init__(self, policy: OutboundPolicy, *, timeout_s: float = 10.0,
                 max_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(resolver=_CheckedResolver(self.policy), use_dns_cache=False,
                                             limit=64)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                                  auto_decompress=True)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, url: str, *, json_body: Any = None, headers: dict[str, str] | None = None,
                      timeout_s: float | None = None) -> Response:
        """One request; the answer whatever its status (``Response.ok`` tells), at most ``max_bytes`` long.

        Raises:
            OutboundRefused: the URL or the addresses it resolves to are not allowed.
            OutboundFailed: unreachable, too slow, too large, or a redirect.
        """
        self.policy.check_url(url)
        timeout = aiohttp.ClientTimeout(total=min(timeout_s or self.timeout_s, self.timeout_s))
        try:
            async with self._client().request(method, url, json=json_body, headers=headers, timeout=timeout,
                                              allow_redirects=False) as resp:
                if 300 <= resp.status < 400:
                    raise OutboundFailed(f"the remote answered with a redirect (HTTP {resp.status}); "
                                         "redirects are not followed")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise OutboundFailed(f"the answer is larger than {self.max_bytes} bytes")
                return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, bytes(body))
        except KefuError:
            raise
        except TimeoutError:
            raise OutboundFailed(f"{method} {url} took longer than {timeout.total:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            inner = exc.__cause__ or exc.os_error
            if isinstance(inner, KefuError):
                raise inner from None
            raise OutboundFailed(f"cannot connect to {exc.host}:{exc.port}: {exc.os_error}") from None
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, KefuError):
                raise exc.__cause__ from None
            raise OutboundFailed(f"{method} {url} failed: {exc}") from None

    async def get(self, url: str, **kw: Any) -> Response:
        return await self.request("GET", url, **kw)

    async def post(self, url: str, json: Any = None, **kw: Any) -> Response:  # noqa: A002 (like aiohttp)
        return await self.request("POST", url, json_body=json, **kw)
