"""Settings from ``KEFU_*`` environment variables, validated at start-up.

Each service subclasses :class:`KefuSettings` with its own fields; pydantic-settings reads the
environment, and :func:`load_settings` turns a validation failure into one clear line instead of a
traceback.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    """

    model_config = SettingsConfigDict(env_prefix="KEFU_", extra="ignore")

    nats_url: str = DEFAULT_NATS_URL
    data_dir: Path = Path(".kefu")
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    log_format: str = Field(default="auto", pattern="^(auto|json|console)$")
    instance: str = Field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    request_timeout: float = Field(default=10.0, gt=0)

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
            name = "KEFU_" + "_".join(str(p) for p in err["loc"]).upper()
            lines.append(f"  {name}: {err['msg']} (got {err.get('input')!r})")
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
