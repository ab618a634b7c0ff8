"""structlog set up once per process: JSON in containers, pretty on a terminal.

Bind ``conversation_id``, ``tenant`` and ``request_id`` with :func:`structlog.contextvars.bind_contextvars`;
message text and tokens are never logged at info level. Values under keys that look like secrets are
masked by a processor, so a token passed by mistake does not reach the log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_SECRET_KEYS = ("token", "secret", "password", "authorization", "api_key")


def _mask_secrets(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in event_dict:
        if any(s in key.lower() for s in _SECRET_KEYS):
            event_dict[key] = "***"
    return event_dict


def configure_logging(service: str, level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger for ``service``.

    Args:
        service: Bound into every line as ``service``.
        level: debug, info, warning or error.
        fmt: ``json``, ``console`` or ``auto`` (console when stderr is a terminal).
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_secrets,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    handler = logging.StreamHandler(sys.stderr)
    if use_json:
        # Libraries' own log lines (nats, aiohttp, asyncio, grpc) as JSON lines too, so a log collector
        # reads every line of a container the same way.
        handler.setFormatter(structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                               structlog.stdlib.add_logger_name, structlog.processors.TimeStamper(fmt="iso", utc=True),
                               _mask_secrets],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]))
    else:
        handler.setFormatter(logging.Formatter(f"{service} %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=max(numeric, logging.INFO), handlers=[handler])
    # Libraries chatter at info; keep their warnings.
    for noisy in ("nats", "aiohttp.access", "sentence_transformers", "httpx", "jieba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> Any:
    """A structlog logger (bound to ``component=name`` when given)."""
    # Initial values keep the logger lazy: a module-level logger must not freeze the configuration
    # that was current at import time.
    return structlog.get_logger(component=name) if name else structlog.get_logger()
