"""What a plugin's tools and hooks are given: who is asking, the plugin's settings, the way out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kefu.plugins.outbound import OutboundHTTP
from kefu.shared.logging import get_logger


@dataclass
class PluginContext:
    """The first argument of every tool, hook and ``self_check``.

    Attributes:
        plugin: the plugin's name.
        tenant: the tenant the call is for ("" in ``self_check``).
        conversation_id: the conversation the call is made in ("" in ``self_check``).
        settings: the plugin's settings for this tenant (validated against its settings schema).
        http: the only way a plugin should call out: allow-listed hosts, no private addresses.
        call_id: unique per tool call, the same on a retry: pass it on as an idempotency key.
        lang: the visitor's language, "zh" or "en", for the ``message`` a tool returns for them.
    """

    plugin: str
    tenant: str
    conversation_id: str
    settings: dict[str, Any]
    http: OutboundHTTP
    call_id: str = ""
    lang: str = "en"
    log: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.log is None:
            self.log = get_logger(f"kefu.plugin.{self.plugin}").bind(tenant=self.tenant,
                                                                    conversation_id=self.conversation_id)
