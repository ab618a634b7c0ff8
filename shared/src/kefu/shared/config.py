"""Settings from ``KEFU_*`` environment variables, validated at start-up.

Each service subclasses :class:`KefuSettings` with its own fields; pydantic-settings reads the
environment, and :func:`load_settings` turns a validation failure into one clear line instead of a
traceback.
"""

from __future__ import annotations

import os
import secrets
import ssl
import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kefu.shared.crypto import parse_master_key

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class KefuSettings(BaseSettings):
    """Settings every service shares.

    Attributes:
        nats_url: Comma-separated NATS server URLs (``KEFU_NATS_URL``).
        data_dir: Where local state lives (``KEFU_DATA_DIR``).
        log_level: debug, info, warning or error (``KEFU_LOG_LEVEL``).
        log_format: ``auto`` (pretty on a terminal, JSON otherwise), ``json`` or ``console``.
        instance: Name of this replica in logs and health replies (default: host and pid).
        request_timeout: Default deadline in seconds for a request over the bus.
        master_key: Encryption at rest on when set: base64 of 32 bytes (``KEFU_MASTER_KEY``, in Kubernetes
            the Secret key ``master-key``); see :mod:`kefu.shared.crypto`.
        master_key_old: The previous master key(s), comma-separated, during a rotation.
        crypto: ``aes`` (AES-256-GCM, SHA-256) or ``sm`` (SM4-GCM, SM3) for new data keys and the audit chain.
        nats_tls_ca: CA bundle that signs the NATS server's certificate (TLS to NATS).
        nats_tls_cert: This client's certificate, for a NATS server that verifies clients (mTLS).
        nats_tls_key: Its private key.
        metrics_port: Port of ``/metrics``, ``/healthz`` and ``/readyz`` (``KEFU_METRICS_PORT``): unset or
            ``off`` serves none (9090 in the images), 0 a free port.
        metrics_host: Interface they listen on (``KEFU_METRICS_HOST``; 0.0.0.0 in the images).
        stream_replicas: Copies JetStream keeps of every stream, KV bucket and object store kefu creates
            (``KEFU_STREAM_REPLICAS``): 1 on one nats-server, 3 on a cluster (an ack then means a majority
            of the nodes hold the message). Applied to existing ones at start-up too, so set the same on
            every service.
    """

    model_config = SettingsConfigDict(env_prefix="KEFU_", extra="ignore")

    nats_url: str = DEFAULT_NATS_URL
    data_dir: Path = Path(".kefu")
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    log_format: str = Field(default="auto", pattern="^(auto|json|console)$")
    instance: str = Field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    request_timeout: float = Field(default=10.0, gt=0)
    master_key: SecretStr | None = None
    master_key_old: SecretStr | None = None
    crypto: Literal["aes", "sm"] = "aes"
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    stream_replicas: int = Field(default=1, ge=1, le=5)  # nats-server's own bounds

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _metrics_off(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "off", "none", "false") else value

    @field_validator("master_key", "master_key_old")
    @classmethod
    def _master_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        for part in value.get_secret_value().split(","):
            if part.strip():
                parse_master_key(part)  # a clear message at start-up, not a failure at the first write
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> KefuSettings:
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("KEFU_NATS_TLS_CERT and KEFU_NATS_TLS_KEY go together")
        for path in (self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"no such file: {path}")
        return self

    def nats_tls(self) -> ssl.SSLContext | None:
        """The TLS context for NATS (None: plain TCP, or the system CAs for a tls:// URL)."""
        if self.nats_tls_ca is None and self.nats_tls_cert is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(self.nats_tls_ca) if self.nats_tls_ca else None)
        if self.nats_tls_cert is not None and self.nats_tls_key is not None:
            ctx.load_cert_chain(str(self.nats_tls_cert), str(self.nats_tls_key))
        return ctx

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build ``cls`` from the environment; exit with a readable message when a value is invalid."""
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [f"invalid configuration for {cls.__name__}:"]
        for err in exc.errors():
            if not err["loc"]:  # a check across fields: its input is every setting, secrets included
                lines.append(f"  {err['msg']}")
                continue
            name = "KEFU_" + "_".join(str(p) for p in err["loc"]).upper()
            shown = "***" if "KEY" in name else repr(err.get("input"))  # never echo a secret
            lines.append(f"  {name}: {err['msg']} (got {shown})")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def admin_token(data_dir: Path) -> str:
    """The admin token: ``KEFU_ADMIN_TOKEN`` when set, else generated once into ``<data_dir>/admin-token``."""
    env = os.environ.get("KEFU_ADMIN_TOKEN", "").strip()
    if env:
        return env
    return _stored_secret(data_dir / "admin-token", nbytes=24)


def signing_secret(data_dir: Path) -> str:
    """The key that signs visitor tokens: ``KEFU_SECRET_KEY`` when set, else generated once on disk."""
    env = os.environ.get("KEFU_SECRET_KEY", "").strip()
    if env:
        return env
    return _stored_secret(data_dir / "secret-key", nbytes=32)


def _stored_secret(path: Path, nbytes: int) -> str:
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    # Created 0600 and exclusively, so two processes starting together agree on one value.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
