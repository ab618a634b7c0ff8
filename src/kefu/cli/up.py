"""``kefu up``: an embedded nats-server (unless --nats-url) and the services as supervised children.

Children are started with a parent-death signal, so nothing outlives this process even when it is
killed; a child that dies is reported and restarted with backoff; SIGINT/SIGTERM stop the services
first (each drains its NATS connection), then nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kefu.cli.client import RUNTIME_FILE
from kefu.proto.bus.v1 import common_pb2
from kefu.shared.bus import Bus
from kefu.shared.config import KefuSettings, admin_token, load_settings, signing_secret
from kefu.shared.errors import KefuError
from kefu.shared.models import DEFAULT_EMBED, DEFAULT_LLM, ModelError, models_dir, pull
from kefu.shared.natsserver import NatsServer, die_with_parent, free_port
from kefu.shared.service import health_subject

READY_TIMEOUT = 600.0  # default of KEFU_READY_TIMEOUT
STOP_GRACE = 15.0


def _broker_child() -> None:
    """In nats-server: ignore the terminal's Ctrl-C (Go keeps an inherited SIG_IGN), so the broker
    outlives the services' drain and is stopped last, by us."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


def say(msg: str) -> None:
    print(f"[kefu] {msg}", flush=True)


@dataclass
class Child:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = field(default=0.0)

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        log.close()
        self.started = time.monotonic()

    def tail(self, n: int = 8) -> str:
        try:
            lines = self.log_path.read_bytes().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line[:300] for line in lines[-n:])


def up(*, http_port: int, grpc_port: int, nats_url: str | None, data_dir: Path, services: list[str],
       host: str = "127.0.0.1") -> int:
    replicas = os.environ.get("KEFU_STREAM_REPLICAS", "1").strip() or "1"
    if not nats_url and replicas != "1":
        say(f"error: KEFU_STREAM_REPLICAS={replicas} needs a NATS cluster (--nats-url with its nodes); "
            "the embedded nats-server is a single node")
        return 2
    data_dir = data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    token = admin_token(data_dir)
    signing_secret(data_dir)  # created now so every gateway replica reads the same key
    if {"inference", "retrieval"} & set(services):
        try:
            _provision_models(data_dir)
        except ModelError as exc:
            say(f"error: {exc}")
            return 1

    nats: NatsServer | None = None
    if not nats_url:
        # fsync before every ack: one node has no peer holding a copy through a power cut (bench.durability:
        # +0.24 ms per ack, 4.4k acks/s; README "Durability").
        nats = NatsServer(data_dir / "nats", log_file=logs / "nats.log", sync_interval="always")
        nats.start(preexec_fn=_broker_child)
        nats_url = nats.url
        say(f"embedded nats-server with JetStream at {nats_url} (data in {data_dir / 'nats'})")

    env = dict(os.environ, KEFU_NATS_URL=nats_url, KEFU_DATA_DIR=str(data_dir), KEFU_HTTP_PORT=str(http_port),
               KEFU_GRPC_PORT=str(grpc_port), KEFU_HTTP_HOST=host, KEFU_GRPC_HOST=host, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", KEFU_LOG_FORMAT=os.environ.get("KEFU_LOG_FORMAT", "json"),
               KEFU_METRICS_HOST=os.environ.get("KEFU_METRICS_HOST") or host)
    try:
        ports = metrics_ports(services, os.environ.get("KEFU_METRICS_PORT", ""))
        ready_s = ready_timeout(os.environ.get("KEFU_READY_TIMEOUT", ""))
    except ValueError as exc:
        say(f"error: {exc}")
        return 2
    children = [Child(name, [sys.executable, "-m", f"kefu.{name}"],
                      dict(env, KEFU_METRICS_PORT=str(ports[name]) if name in ports else "off"), logs / f"{name}.log")
                for name in services]
    try:
        metrics = {name: f"http://{env['KEFU_METRICS_HOST']}:{port}/metrics" for name, port in ports.items()}
        return asyncio.run(_run(children, nats_url, data_dir, token, http_port, grpc_port, host, metrics,
                                ready_s))
    finally:
        _stop_children(children)
        if nats is not None:
            nats.stop()
        with contextlib.suppress(OSError):
            (data_dir / RUNTIME_FILE).unlink()
        say("stopped")


def metrics_ports(services: list[str], setting: str) -> dict[str, int]:
    """Each child's own port for /metrics and /healthz: consecutive ports from ``KEFU_METRICS_PORT`` when it
    is a number, free ones when it is unset or 0, none when it is ``off``. Chosen once, so a restarted
    child keeps its port."""
    value = setting.strip().lower()
    if value in ("off", "none", "false"):
        return {}
    if value in ("", "0"):
        return {name: free_port() for name in services}
    if not value.isdigit() or not 0 < int(value) <= 65535 - len(services):
        raise ValueError(f"KEFU_METRICS_PORT must be a port, 0 or off (got {setting!r})")
    return {name: int(value) + i for i, name in enumerate(services)}


def ready_timeout(setting: str) -> float:
    """Seconds ``kefu up`` waits for every service to be ready (``KEFU_READY_TIMEOUT``; longer on a slow or
    emulated node, where loading the models takes minutes)."""
    if not setting.strip():
        return READY_TIMEOUT
    try:
        value = float(setting)
    except ValueError:
        value = 0.0
    if not 0 < value <= 86400:
        raise ValueError(f"KEFU_READY_TIMEOUT must be seconds between 0 and 86400 (got {setting!r})")
    return value


def _provision_models(data_dir: Path) -> None:
    directory = models_dir(data_dir)
    wanted = [spec for spec, env in ((DEFAULT_LLM, "KEFU_LLM_MODEL"), (DEFAULT_EMBED, "KEFU_EMBED_MODEL"))
              if not os.environ.get(env)]
    if wanted and not all((directory / s.name).exists() for s in wanted):
        say(f"provisioning models into {directory}")
        pull(directory, tuple(wanted))


async def _run(children: list[Child], nats_url: str, data_dir: Path, token: str, http_port: int, grpc_port: int,
               host: str, metrics: dict[str, str], ready_s: float = READY_TIMEOUT) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP reloads what can be reloaded: the plugins service's plugin modules.
    loop.add_signal_handler(signal.SIGHUP, _forward_hup, children)
    for c in children:
        c.start()
    say(f"starting {', '.join(c.name for c in children)} (logs in {children[0].log_path.parent})")
    # The children's TLS settings (KEFU_NATS_TLS_*) are ours too, for an external NATS that wants them.
    bus = await Bus.connect([nats_url], "kefu-up", default_timeout=2.0, tls=load_settings(KefuSettings).nats_tls())
    try:
        t0 = time.monotonic()
        pending = {c.name for c in children}
        while pending and not stop.is_set():
            for c in children:
                _check(c, stop)
            for name in list(pending):
                if await _healthy(bus, name):
                    pending.discard(name)
                    say(f"{name} is ready")
            if time.monotonic() - t0 > ready_s:
                say(f"error: not ready after {ready_s:.0f}s (KEFU_READY_TIMEOUT): {', '.join(sorted(pending))}")
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.3)
        if stop.is_set():
            return 0
        http_url = f"http://{host}:{http_port}"
        (data_dir / RUNTIME_FILE).write_text(json.dumps({
            "pid": os.getpid(), "nats_url": nats_url, "http_url": http_url, "grpc": f"{host}:{grpc_port}",
            "metrics": metrics}))
        say(f"ready in {time.monotonic() - t0:.1f}s")
        if "gateway" in {c.name for c in children}:
            say(f"gateway:     {http_url}   (gRPC {host}:{grpc_port})")
        if metrics:
            say("metrics:     " + ", ".join(f"{name} :{url.rsplit(':', 1)[1].split('/')[0]}" for name, url in metrics.items())
                + f"   (/metrics and /healthz of each; the URLs are in {data_dir / RUNTIME_FILE})")
        say(f"admin token: {token}")
        say("press Ctrl-C to stop")
        while not stop.is_set():
            for c in children:
                _check(c, stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        say("stopping")
        return 0
    finally:
        await bus.close()


def _forward_hup(children: list[Child]) -> None:
    for c in children:
        if c.name == "plugins" and c.proc is not None and c.proc.poll() is None:
            c.proc.send_signal(signal.SIGHUP)
            say("plugins: reloading (SIGHUP)")


async def _healthy(bus: Bus, name: str) -> bool:
    try:
        reply = await bus.request(health_subject(name), common_pb2.HealthRequest(), common_pb2.HealthReply,
                                  timeout=1.0)
        return reply.status == "ok"
    except KefuError:
        return False


def _check(c: Child, stop: asyncio.Event) -> None:
    """Restart ``c`` if it died (with backoff), unless we are stopping."""
    if stop.is_set() or c.proc is None or c.proc.poll() is None:
        return
    code = c.proc.returncode
    backoff = min(30.0, 2.0 ** min(c.restarts, 5))
    if time.monotonic() - c.started < backoff:
        return  # wait before restarting a service that keeps dying
    c.restarts += 1
    say(f"{c.name} exited with code {code}; restarting (restart #{c.restarts}). Last log lines:\n{c.tail()}")
    c.start()


def _stop_children(children: list[Child]) -> None:
    running = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for c in running:
        with contextlib.suppress(ProcessLookupError):
            c.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    deadline = time.monotonic() + STOP_GRACE
    for c in running:
        try:
            c.proc.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            say(f"{c.name} did not stop in {STOP_GRACE:.0f}s; killing it")
            c.proc.kill()  # type: ignore[union-attr]
            c.proc.wait()  # type: ignore[union-attr]
