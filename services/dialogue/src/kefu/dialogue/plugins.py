"""Dialogue's side of the plugins: what each tenant's enabled plugins offer (cached, refreshed when the
plugins service reloads), their hooks, and tool calls. The rules of use are in :mod:`kefu.dialogue.tools`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from kefu.dialogue.tools import ToolSpec
from kefu.proto.bus.v1 import plugin_pb2
from kefu.shared.bus import Bus
from kefu.shared.errors import KefuError
from kefu.shared.logging import get_logger

log = get_logger("kefu.dialogue.plugins")

PLUGINS_CHANGED = "kefu.plugins.changed"
# How long a tenant's listing is trusted when no change was announced (a missed announcement heals).
LISTING_TTL_S = 30.0
# After a failed listing (no plugins service): how long turns go on without asking again.
FAILED_LISTING_TTL_S = 5.0
HOOK_TIMEOUT_S = 1.5
LIST_TIMEOUT_S = 1.0


@dataclass
class Offer:
    """What a tenant's enabled plugins offer."""

    tools: list[ToolSpec] = field(default_factory=list)
    hooks: set[str] = field(default_factory=set)
    fetched: float = 0.0
    ttl: float = LISTING_TTL_S


def specs_from_listing(reply: plugin_pb2.ListPluginsReply) -> Offer:
    offer = Offer(fetched=time.monotonic())
    for p in reply.plugins:
        offer.hooks.update(p.hooks)
        tools = {t.name: t for t in p.tools}
        for i in p.intents:
            t = tools.get(i.tool)
            if t is None:
                continue
            try:
                required = tuple(json.loads(t.arguments_schema).get("required", []))
            except ValueError:
                required = ()
            offer.tools.append(ToolSpec(p.name, t.name, t.side_effecting, t.confirmation or "visitor",
                                        tuple(i.keywords), tuple(i.examples), dict(i.slot_arguments), required,
                                        i.ask_zh, i.ask_en, t.confirm_zh, t.confirm_en))
    return offer


class Plugins:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._offers: dict[str, Offer] = {}

    async def setup(self) -> None:
        async def changed(_: object) -> None:
            self._offers.clear()

        await self.bus.nc.subscribe(PLUGINS_CHANGED, cb=changed)

    async def offer(self, tenant: str) -> Offer:
        """The tenant's tools and hooks; nothing (and no error) while the plugins service is away."""
        cached = self._offers.get(tenant)
        if cached is not None and time.monotonic() - cached.fetched < cached.ttl:
            return cached
        try:
            reply = await self.bus.request("kefu.plugins.list", plugin_pb2.ListPluginsRequest(tenant=tenant),
                                           plugin_pb2.ListPluginsReply, timeout=LIST_TIMEOUT_S)
        except KefuError as exc:
            log.warning("plugins not listed", tenant=tenant, code=exc.code)
            # What was offered before stays offered; either way, not asked again on every turn.
            offer = Offer(cached.tools, cached.hooks) if cached else Offer()
            offer.fetched, offer.ttl = time.monotonic(), FAILED_LISTING_TTL_S
            self._offers[tenant] = offer
            return offer
        offer = self._offers[tenant] = specs_from_listing(reply)
        return offer

    async def hook(self, hook: str, tenant: str, conversation_id: str, text: str, lang: str,
                   slots: dict[str, str], reply_text: str = "") -> list[plugin_pb2.HookResult]:
        """Every enabled plugin's ``hook``; [] when none has it or the plugins service does not answer in time."""
        if hook not in (await self.offer(tenant)).hooks:
            return []
        try:
            reply = await self.bus.request("kefu.plugins.hook", plugin_pb2.HookRequest(
                hook=hook, tenant=tenant, conversation_id=conversation_id, text=text, reply_text=reply_text,
                slots=slots, lang=lang), plugin_pb2.HookReply, timeout=HOOK_TIMEOUT_S)
        except KefuError as exc:  # a hook is an enhancement: the visitor is answered either way
            log.warning("hook not run", hook=hook, code=exc.code)
            return []
        return list(reply.results)

    async def call(self, req: plugin_pb2.ToolCallRequest, timeout: float) -> plugin_pb2.ToolCallReply:
        return await self.bus.request("kefu.plugins.call", req, plugin_pb2.ToolCallReply, timeout=timeout)
