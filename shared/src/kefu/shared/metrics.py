"""Prometheus metrics of the kefu services, and the small HTTP server that serves them with ``/healthz``.

Every service serves, on ``KEFU_METRICS_PORT`` (9090 in the images; off for a bare process unless set;
``kefu up`` gives each child a free port of its own):

- ``GET /metrics``: the Prometheus text format (kefu's metrics below plus the process metrics);
- ``GET /healthz``: 200 when the process is up and connected to NATS, else 503 (a liveness probe);
- ``GET /readyz``: 200 once the service has started (models loaded, subscribed) and is connected, else
  503 (a readiness probe).

The names and labels are a contract with the Grafana dashboard of the chart; keep them exactly:

============================================  =========  ===========================  =========
name                                          type       labels                       service
============================================  =========  ===========================  =========
``kefu_turn_duration_seconds``                histogram  ``source``                   dialogue
``kefu_llm_time_to_first_token_seconds``      histogram                               inference
``kefu_llm_tokens_total``                     counter                                 inference
``kefu_llm_generation_seconds``               histogram                               inference
``kefu_llm_queue_depth``                      gauge                                   inference
``kefu_kb_freshness_lag_seconds``             histogram                               retrieval
``kefu_errors_total``                         counter    ``service``, ``code``        every one
``kefu_http_requests_total``                  counter    ``route``, ``status``        gateway
``kefu_ws_connections``                       gauge                                   gateway
``kefu_plugin_calls_total``                   counter    ``plugin``, ``tool``,        plugins
                                                         ``outcome``
============================================  =========  ===========================  =========

Tokens per second is ``rate(kefu_llm_tokens_total) / rate(kefu_llm_generation_seconds_sum)``.

A metric is created the first time it is asked for, so a process exposes only the metrics of the
services it runs (:func:`declare` creates a service's own at start-up, so they show from the first
scrape); the five services of one test process share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import prometheus_client
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from kefu.shared.logging import get_logger

log = get_logger("kefu.metrics")

# `_created` samples double every counter's series for nothing a dashboard uses.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
# A scrape waits at most this long for the values gathered on demand (e.g. the LLM queue's depth).
COLLECT_TIMEOUT_S = 2.0
# A request line and headers larger than this, or slower than the timeout, are not HTTP we answer.
MAX_REQUEST_BYTES = 16 * 1024
REQUEST_TIMEOUT_S = 5.0

_made: dict[str, Any] = {}


def _metric(kind: type, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs: Any) -> Any:
    metric = _made.get(name)
    if metric is None:
        metric = _made[name] = kind(name, doc, labels, registry=REGISTRY, **kwargs)
    return metric


def turn_duration() -> Histogram:
    """Seconds from a visitor message reaching dialogue to its reply being stored, by reply ``source``."""
    return _metric(Histogram, "kefu_turn_duration_seconds", "Time to answer a visitor message, by reply source",
                   ("source",), buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 90))


def llm_time_to_first_token() -> Histogram:
    """Seconds from a generation job starting on a replica to its first text."""
    return _metric(Histogram, "kefu_llm_time_to_first_token_seconds", "Time to the first generated token",
                   buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16))


def llm_tokens() -> Counter:
    """Tokens generated (completion tokens of every finished job)."""
    return _metric(Counter, "kefu_llm_tokens_total", "Tokens generated")


def llm_generation() -> Histogram:
    """Seconds a generation job ran, first token to last (with the prompt's processing)."""
    return _metric(Histogram, "kefu_llm_generation_seconds", "Time a generation job ran",
                   buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))


def llm_queue_depth() -> Gauge:
    """Generation jobs waiting in stream LLM (not yet taken by a replica)."""
    return _metric(Gauge, "kefu_llm_queue_depth", "Generation jobs waiting in stream LLM")


def kb_freshness_lag() -> Histogram:
    """Seconds from a KB change being stored (acknowledged) to it being searchable on this replica."""
    return _metric(Histogram, "kefu_kb_freshness_lag_seconds", "Time from a KB change acknowledged to indexed",
                   buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))


def errors() -> Counter:
    """Errors answered to a caller, by ``service`` and error ``code`` (the CONTRACT's snake_case codes)."""
    return _metric(Counter, "kefu_errors_total", "Errors answered, by service and code", ("service", "code"))


def http_requests() -> Counter:
    """Gateway HTTP requests by ``route`` template (``/v1/conversations/{cid}/messages``) and ``status``."""
    return _metric(Counter, "kefu_http_requests_total", "HTTP requests, by route template and status",
                   ("route", "status"))


def ws_connections() -> Gauge:
    """Open WebSockets on this gateway (visitors and agents)."""
    return _metric(Gauge, "kefu_ws_connections", "Open WebSocket connections")


def plugin_calls() -> Counter:
    """Plugin tool calls and hooks by ``plugin``, ``tool`` (``hook:<name>`` for hooks) and ``outcome``
    (``ok``, ``replayed`` or the error code)."""
    return _metric(Counter, "kefu_plugin_calls_total", "Plugin calls, by plugin, tool and outcome",
                   ("plugin", "tool", "outcome"))


_OWN: dict[str, tuple[Callable[[], Any], ...]] = {
    "dialogue": (turn_duration,),
    "inference": (llm_time_to_first_token, llm_tokens, llm_generation, llm_queue_depth),
    "retrieval": (kb_freshness_lag,),
    "gateway": (http_requests, ws_connections),
    "plugins": (plugin_calls,),
}


def declare(service: str) -> None:
    """Create the metrics ``service`` owns (and ``kefu_errors_total``), so they show before first use."""
    errors()
    for make in _OWN.get(service, ()):
        make()


def count_error(service: str, code: str) -> None:
    """Count one error answered by ``service``."""
    errors().labels(service, code).inc()


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over plain HTTP/1.1 on the service's event loop.

    Args:
        host: Interface to listen on.
        port: Port (0: a free one; see :attr:`port` once started).
        healthy: True when the process can do its work (connected to NATS).
        ready: True once the service has started.
    """

    def __init__(self, host: str, port: int, *, healthy: Callable[[], bool], ready: Callable[[], bool]) -> None:
        self.host = host
        self.port = port
        self._healthy = healthy
        self._ready = ready
        self._collectors: list[Callable[[], Awaitable[None]]] = []
        self._server: asyncio.Server | None = None

    def on_scrape(self, collect: Callable[[], Awaitable[None]]) -> None:
        """Run ``collect`` before each scrape (to read a value that is costly to keep current)."""
        self._collectors.append(collect)

    async def start(self) -> int:
        """Listen; the bound port."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_REQUEST_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _collect(self) -> None:
        for collect in self._collectors:
            try:
                await asyncio.wait_for(collect(), COLLECT_TIMEOUT_S)
            except Exception as exc:  # a stale value is better than no scrape
                log.warning("metric not collected", error=str(exc) or type(exc).__name__)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                ConnectionError):
            writer.close()
            return
        path = target.split("?", 1)[0]
        try:
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "application/json", _error("method_not_allowed", "use GET")
            elif path == "/metrics":
                await self._collect()
                status, ctype, body = 200, CONTENT_TYPE, prometheus_client.generate_latest(REGISTRY)
            elif path == "/healthz":
                status, ctype, body = self._probe(self._healthy())
            elif path == "/readyz":
                status, ctype, body = self._probe(self._healthy() and self._ready(), "not_ready")
            else:
                status, ctype, body = 404, "application/json", _error("not_found", f"no route {path[:100]}")
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _probe(self, ok: bool, code: str = "unavailable") -> tuple[int, str, bytes]:
        if ok:
            return 200, "application/json", b'{"status": "ok"}'
        why = "not connected to NATS" if not self._healthy() else "still starting"
        return 503, "application/json", _error(code, why)


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()
