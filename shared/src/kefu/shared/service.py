"""The life of a kefu service process: settings, logging, the bus, start-up, health, graceful stop.

A service implements :class:`Service`; its ``__main__`` is ``asyncio.run(run_service(MyService()))``.
Heavy things (models, indexes) load in :meth:`Service.start`, never at import, and the health
responder is subscribed only after ``start`` returns, so "healthy" means "ready to answer". With
``KEFU_METRICS_PORT`` set, every service also serves ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP
(:mod:`kefu.shared.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import signal
import time
from contextlib import AsyncExitStack
from typing import ClassVar

from nats.aio.msg import Msg

from kefu.proto.bus.v1 import common_pb2
from kefu.shared import __version__, metrics
from kefu.shared.bus import Bus
from kefu.shared.config import KefuSettings, load_settings
from kefu.shared.logging import configure_logging, get_logger
from kefu.shared.metrics import MetricsServer


def health_subject(service: str) -> str:
    return f"kefu.health.{service}"


class Service:
    """Base class of the five services.

    Attributes:
        name: The service name (subject ``kefu.health.<name>``, log field ``service``).
        settings_class: The service's Settings class.
    """

    name: ClassVar[str] = "service"
    settings_class: ClassVar[type[KefuSettings]] = KefuSettings

    def __init__(self, settings: KefuSettings | None = None) -> None:
        self.settings = settings or load_settings(self.settings_class)
        self.log = get_logger(f"kefu.{self.name}")
        self.bus: Bus | None = None
        self.started_at = 0.0
        self.ready = asyncio.Event()
        self.metrics: MetricsServer | None = None

    async def start(self, bus: Bus, stack: AsyncExitStack) -> None:
        """Load what the service needs and subscribe; register clean-ups on ``stack``."""

    def health_details(self) -> dict[str, str]:
        """Extra fields for the health reply (loaded model, applied sequence, ...)."""
        return {}

    async def serve_forever(self, stop: asyncio.Event) -> None:
        """Connect, start, answer health checks until ``stop`` is set, then shut down in order."""
        async with AsyncExitStack() as stack:
            metrics.declare(self.name)
            if self.settings.metrics_port is not None:
                # Up before NATS is reached, so a liveness probe sees 503 (not a refused connection) meanwhile.
                self.metrics = MetricsServer(self.settings.metrics_host, self.settings.metrics_port,
                                             healthy=self._connected, ready=self.ready.is_set)
                await self.metrics.start()
                stack.push_async_callback(self.metrics.close)
                self.log.info("metrics", url=f"http://{self.settings.metrics_host}:{self.metrics.port}/metrics")
            bus = await Bus.connect(self.settings.nats_servers, f"kefu-{self.name}-{self.settings.instance}",
                                    default_timeout=self.settings.request_timeout, tls=self.settings.nats_tls(),
                                    stream_replicas=self.settings.stream_replicas)
            bus.service = self.name
            self.bus = bus
            stack.push_async_callback(bus.close)
            t0 = time.monotonic()
            await self.start(bus, stack)
            self.started_at = time.time()
            self.ready.set()
            await bus.serve(health_subject(self.name), common_pb2.HealthRequest, self._health)
            self.log.info("ready", startup_s=round(time.monotonic() - t0, 2), instance=self.settings.instance)
            await stop.wait()
            self.log.info("stopping")
            watchdog = asyncio.get_running_loop().call_later(5.0, self._report_stuck_shutdown)
        watchdog.cancel()
        self.log.info("stopped")

    def _connected(self) -> bool:
        return self.bus is not None and self.bus.nc.is_connected

    def _report_stuck_shutdown(self) -> None:
        """Shutdown is taking long: log what every task is waiting on."""
        import io

        for task in asyncio.all_tasks():
            out = io.StringIO()
            task.print_stack(limit=6, file=out)
            self.log.warning("shutdown waiting", task=task.get_name(), stack=out.getvalue())

    async def _health(self, _: common_pb2.HealthRequest, __: Msg) -> common_pb2.HealthReply:
        details = self.health_details()
        if self.metrics is not None:
            details["metrics_port"] = str(self.metrics.port)
        return common_pb2.HealthReply(service=self.name, instance=self.settings.instance, status="ok",
                                      version=__version__, details=details)


async def start_in_background(service: Service, stop: asyncio.Event, timeout: float = 300.0) -> asyncio.Task[None]:
    """Run ``service`` as a task of this event loop (tests, benchmarks) and return once it is ready.

    Raises:
        Whatever made the service fail during start-up, or TimeoutError.
    """
    task = asyncio.create_task(service.serve_forever(stop), name=service.name)
    ready = asyncio.create_task(service.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()
        raise RuntimeError(f"{service.name} stopped during start-up")
    if ready not in done:
        ready.cancel()
        task.cancel()
        raise TimeoutError(f"{service.name} not ready after {timeout}s")
    return task


async def run_service(service: Service) -> None:
    """Run ``service`` until SIGTERM or SIGINT."""
    configure_logging(service.name, service.settings.log_level, service.settings.log_format)
    # `kill -USR1 <pid>` prints every thread's stack: how to see where a stuck service is.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await service.serve_forever(stop)
