"""The plugins service: runs plugin tools and hooks under a policy the model cannot talk its way past.

- Tools: arguments checked against the tool's JSON schema; per-tenant enable/disable and settings (KV
  ``plugin_config``); per-tool timeout and rate limit; a call id runs at most once (KV ``plugin_calls``).
- A side-effecting tool runs only when the request names the ToolCallConfirmed event of exactly this
  call in stream CONV, which this service reads itself: what the dialogue service (or a model) claims
  is not enough, the conversation log must show the visitor's (or an agent's) yes.
- Hot reload on SIGHUP or ``kefu.plugins.reload``: see :class:`kefu.plugins.registry.Registry`.

The plugins directory is ``KEFU_PLUGINS_DIR``, else ``<data-dir>/plugins``, which the first start fills
with the built-in plugins (crm_adapter, payment, ai_enhancer) for the operator to edit and reload.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from pydantic import Field

from kefu.plugins.context import PluginContext
from kefu.plugins.outbound import OutboundHTTP, OutboundPolicy
from kefu.plugins.registry import Plugin, Registry, Snapshot, Tool
from kefu.proto.bus.v1 import events_pb2, plugin_pb2
from kefu.shared import metrics
from kefu.shared.audit import AuditLog
from kefu.shared.bus import Bus, decode, ensure_kv, ensure_stream, subject_token
from kefu.shared.config import KefuSettings
from kefu.shared.crypto import Keyring, open_event
from kefu.shared.errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    Internal,
    KefuError,
    NotFound,
    PermissionDenied,
)
from kefu.shared.ratelimit import RateLimiter
from kefu.shared.service import Service
from kefu.shared.streams import STREAM_CONV, arguments_sha256, conv_stream, conv_subject

PLUGINS_LIST = "kefu.plugins.list"
PLUGINS_CALL = "kefu.plugins.call"
PLUGINS_HOOK = "kefu.plugins.hook"
PLUGINS_RELOAD = "kefu.plugins.reload"
PLUGINS_CONFIGURE = "kefu.plugins.configure"
PLUGINS_CHANGED = "kefu.plugins.changed"
KV_PLUGIN_CONFIG = "plugin_config"
KV_PLUGIN_CALLS = "plugin_calls"
# A confirmation older than this no longer allows the call (the visitor said yes to something else by then).
CONFIRMATION_MAX_AGE_S = 15 * 60
HOOK_TIMEOUT_S = 2.0


BUILTIN_DIR = Path(__file__).parent / "builtin"


class PluginsSettings(KefuSettings):
    # Where plugin modules live; unset: <data-dir>/plugins, filled with the built-in plugins on first start.
    plugins_dir: Path | None = None
    # Upper bound of any tool's own timeout.
    tool_timeout: float = Field(default=10.0, gt=0)
    # Outbound HTTP of plugins: hosts they may call (comma-separated; "*.corp.example", "crm:8443"), and
    # private networks they may reach (CIDRs; by default none: no private, loopback or link-local address).
    plugins_allowed_hosts: str = ""
    plugins_allowed_networks: str = ""
    plugins_outbound_timeout: float = Field(default=10.0, gt=0)


def _split(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


class PluginsService(Service):
    name = "plugins"
    settings_class = PluginsSettings
    settings: PluginsSettings

    def __init__(self, settings: PluginsSettings | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        self.http = OutboundHTTP(OutboundPolicy(_split(s.plugins_allowed_hosts), _split(s.plugins_allowed_networks)),
                                 timeout_s=s.plugins_outbound_timeout)
        self.directory = s.plugins_dir or s.data_dir / "plugins"
        self.registry = Registry(self.directory, lambda p: PluginContext(p.name, "", "", {}, self.http))
        self._limits: dict[tuple[str, str], RateLimiter] = {}
        self._bus: Bus | None = None
        self.keyring = Keyring(None, None)

    @property
    def plugins(self) -> dict[str, Plugin]:
        return self.registry.current.plugins

    async def start(self, bus: Bus, stack: AsyncExitStack) -> None:
        self._bus = bus
        if self.settings.plugins_dir is None and not self.directory.exists():
            shutil.copytree(BUILTIN_DIR, self.directory, ignore=shutil.ignore_patterns("__pycache__"))
            self.log.info("built-in plugins copied", directory=str(self.directory))
        stack.push_async_callback(self.http.close)
        # Confirmations in CONV and tenants' plugin settings (API keys) are sealed when encryption is on.
        self.keyring = Keyring.from_settings(bus.js, self.settings)
        self.audit = AuditLog(bus.js, self.settings.crypto, f"plugins/{self.settings.instance}")
        await self.audit.setup()
        await ensure_stream(bus.js, conv_stream())
        self.config_kv: KeyValue = await ensure_kv(bus.js, KeyValueConfig(bucket=KV_PLUGIN_CONFIG, history=1,
                                                                          storage=StorageType.FILE))
        self.calls_kv: KeyValue = await ensure_kv(bus.js, KeyValueConfig(bucket=KV_PLUGIN_CALLS, history=1,
                                                                         ttl=7 * 24 * 3600.0,
                                                                         storage=StorageType.FILE))
        await self.reload()
        loop = asyncio.get_running_loop()
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload_on_signal()))
            stack.callback(loop.remove_signal_handler, signal.SIGHUP)
        await bus.serve(PLUGINS_LIST, plugin_pb2.ListPluginsRequest, self._list, queue="plugins")
        await bus.serve(PLUGINS_CALL, plugin_pb2.ToolCallRequest, self._call, queue="plugins")
        await bus.serve(PLUGINS_HOOK, plugin_pb2.HookRequest, self._hook, queue="plugins")
        await bus.serve(PLUGINS_CONFIGURE, plugin_pb2.ConfigurePluginRequest, self._configure, queue="plugins")
        # Every replica reloads: no queue group.
        await bus.serve(PLUGINS_RELOAD, plugin_pb2.ReloadRequest, self._reload_request)

    async def _reload_on_signal(self) -> None:
        """SIGHUP: reload, and record it (a reload asked through the gateway is recorded there)."""
        snap = await self.reload()
        with suppress(KefuError):  # logged by the audit log; the reload itself is done
            await self.audit.record("plugins.reload", "signal:SIGHUP", details={
                "generation": snap.generation, "errors": len(snap.errors),
                "plugins": ",".join(f"{p.name}={p.version}" for p in snap.plugins.values())})

    async def reload(self) -> Snapshot:
        before = self.registry.current.generation
        snap = await self.registry.reload()
        self.log.info("plugins loaded", plugins={p.name: p.version for p in snap.plugins.values()},
                      errors=len(snap.errors), generation=snap.generation)
        if snap.generation != before and self._bus is not None:
            with suppress(Exception):
                await self._bus.publish(PLUGINS_CHANGED, self._listing(snap, None, {}))
        return snap

    def health_details(self) -> dict[str, str]:
        snap = self.registry.current
        return {"plugins": ",".join(f"{p.name}@{p.version}" for p in snap.plugins.values()),
                "errors": str(len(snap.errors)), "generation": str(snap.generation)}

    # Listing and configuration

    def _listing(self, snap: Snapshot, tenant: str | None, configs: dict[str, plugin_pb2.PluginConfig],
                 everything: bool = False) -> plugin_pb2.ListPluginsReply:
        reply = plugin_pb2.ListPluginsReply(generation=snap.generation, instance=self.settings.instance)
        for p in snap.plugins.values():
            enabled = self._enabled(p, configs.get(p.name))
            if tenant is not None and not enabled and not everything:
                continue
            info = reply.plugins.add(name=p.name, version=p.version, description=p.description,
                                     hooks=sorted(p.hooks), enabled=enabled)
            if tenant is not None and everything and p.name in configs:
                info.settings_json = configs[p.name].settings_json
            for t in p.tools.values():
                info.tools.add(name=t.name, description=t.description, arguments_schema=json.dumps(t.arguments),
                               side_effecting=t.side_effecting, confirmation=t.confirmation, timeout_s=t.timeout_s,
                               confirm_zh=t.confirm_zh, confirm_en=t.confirm_en)
            for i in p.intents:
                info.intents.add(tool=i.tool, keywords=i.keywords, examples=i.examples,
                                 slot_arguments=i.slot_arguments, ask_zh=i.ask_zh, ask_en=i.ask_en)
        for e in snap.errors:
            reply.errors.add(path=e.path, error=e.error, serving_version=e.serving_version)
        return reply

    @staticmethod
    def _enabled(plugin: Plugin, config: plugin_pb2.PluginConfig | None) -> bool:
        return config.enabled if config is not None else plugin.enabled_by_default

    async def _config(self, tenant: str, plugin: str) -> plugin_pb2.PluginConfig | None:
        try:
            entry = await self.config_kv.get(f"{tenant}.{plugin}")
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return decode(plugin_pb2.PluginConfig, await self.keyring.open(entry.value, _config_context(tenant, plugin)))

    async def _configs(self, tenant: str, snap: Snapshot) -> dict[str, plugin_pb2.PluginConfig]:
        found = await asyncio.gather(*(self._config(tenant, name) for name in snap.plugins))
        return {name: c for name, c in zip(snap.plugins, found, strict=True) if c is not None}

    async def _list(self, req: plugin_pb2.ListPluginsRequest, _: Msg) -> plugin_pb2.ListPluginsReply:
        snap = self.registry.current
        if not req.tenant:
            return self._listing(snap, None, {})
        subject_token(req.tenant)
        return self._listing(snap, req.tenant, await self._configs(req.tenant, snap), req.all)

    async def _configure(self, req: plugin_pb2.ConfigurePluginRequest, _: Msg) -> plugin_pb2.ConfigurePluginReply:
        subject_token(req.tenant)
        plugin = self.plugins.get(req.plugin)
        if plugin is None:
            raise NotFound(f"no plugin {req.plugin!r}", code="unknown_plugin")
        settings = _json_object(req.settings_json or "{}", "settings")
        plugin.validate_settings(settings)
        text = json.dumps(settings, ensure_ascii=False, sort_keys=True)
        config = plugin_pb2.PluginConfig(enabled=req.enabled, settings_json=text, updated_ms=int(time.time() * 1000))
        await self.config_kv.put(f"{req.tenant}.{req.plugin}", await self.keyring.seal(
            req.tenant, config.SerializeToString(), _config_context(req.tenant, req.plugin)))
        self.log.info("plugin configured", tenant=req.tenant, plugin=req.plugin, enabled=req.enabled)
        return plugin_pb2.ConfigurePluginReply(tenant=req.tenant, plugin=req.plugin, enabled=req.enabled,
                                               settings_json=text)

    async def _reload_request(self, _: plugin_pb2.ReloadRequest, __: Msg) -> plugin_pb2.ListPluginsReply:
        return self._listing(await self.reload(), None, {})

    def _context(self, plugin: Plugin, tenant: str, conversation_id: str, config: plugin_pb2.PluginConfig | None,
                 *, call_id: str = "", lang: str = "") -> PluginContext:
        settings = json.loads(config.settings_json) if config is not None and config.settings_json else {}
        return PluginContext(plugin.name, tenant, conversation_id, settings, self.http, call_id=call_id,
                             lang=lang or "en")

    # Tool calls

    async def _call(self, req: plugin_pb2.ToolCallRequest, msg: Msg) -> plugin_pb2.ToolCallReply:
        # Labelled with names the registry knows only: a caller's made-up names must not add series.
        plugin = self.registry.current.plugins.get(req.plugin)
        known = plugin is not None and req.tool in plugin.tools
        labels = (req.plugin, req.tool) if known else ("unknown", "unknown")
        try:
            reply = await self._call_tool(req, msg)
        except KefuError as exc:
            metrics.plugin_calls().labels(*labels, exc.code).inc()
            raise
        except Exception:
            metrics.plugin_calls().labels(*labels, "internal").inc()
            raise
        metrics.plugin_calls().labels(*labels, "replayed" if reply.replayed else "ok").inc()
        return reply

    async def _call_tool(self, req: plugin_pb2.ToolCallRequest, _: Msg) -> plugin_pb2.ToolCallReply:
        subject_token(req.tenant)
        if req.conversation_id:
            subject_token(req.conversation_id)
        snap = self.registry.current  # the call finishes on the versions it started with
        plugin = snap.plugins.get(req.plugin)
        tool = plugin.tools.get(req.tool) if plugin else None
        if plugin is None or tool is None:
            raise NotFound(f"no tool {req.plugin}.{req.tool}", code="unknown_tool")
        config = await self._config(req.tenant, plugin.name)
        if not self._enabled(plugin, config):
            raise PermissionDenied(f"plugin {plugin.name!r} is not enabled for this tenant", code="plugin_disabled")
        args = _json_object(req.arguments_json or "{}", "arguments")
        tool.validate(args)
        if tool.side_effecting:
            await self._check_confirmation(req, tool)
        limiter = self._limits.setdefault((plugin.name, tool.name), RateLimiter(tool.rate_per_minute / 60.0,
                                                                                 max(1.0, tool.rate_per_minute / 6)))
        limiter.check(req.tenant)
        if req.call_id:
            subject_token(req.call_id)
            if (done := await self._claim(req.call_id, req.tenant)) is not None:
                return done
        try:
            ctx = self._context(plugin, req.tenant, req.conversation_id, config, call_id=req.call_id, lang=req.lang)
            result = await self._run(plugin, tool, args, ctx)
        except BaseException:
            if req.call_id:
                with suppress(Exception):
                    await self.calls_kv.delete(req.call_id)  # it did not run: a retry may try again
            raise
        reply = plugin_pb2.ToolCallReply(result_json=json.dumps(result, ensure_ascii=False, default=str),
                                         version=plugin.version)
        if req.call_id:
            # The result can hold what the tool looked up (an order, an address): sealed like the conversation.
            await self.calls_kv.put(req.call_id, await self.keyring.seal(req.tenant, reply.SerializeToString(),
                                                                         _call_context(req.call_id)))
        self.log.info("tool called", plugin=plugin.name, version=plugin.version, tool=tool.name, tenant=req.tenant,
                      conversation_id=req.conversation_id, side_effecting=tool.side_effecting)
        return reply

    async def _claim(self, call_id: str, tenant: str) -> plugin_pb2.ToolCallReply | None:
        """None when this replica may run ``call_id`` now; its stored result when it already ran."""
        try:
            await self.calls_kv.create(call_id, b"")
            return None
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        entry = await self.calls_kv.get(call_id)
        if not entry.value:
            raise Conflict(f"call {call_id} is running", code="call_in_progress")
        if (owner := Keyring.tenant_of(entry.value)) is not None and owner != tenant:
            raise Conflict(f"call id {call_id} is taken", code="call_in_progress")
        done = decode(plugin_pb2.ToolCallReply, await self.keyring.open(entry.value, _call_context(call_id)))
        done.replayed = True
        return done

    async def _run(self, plugin: Plugin, tool: Tool, args: dict[str, Any], ctx: PluginContext) -> Any:
        timeout = min(tool.timeout_s, self.settings.tool_timeout)
        try:
            return await asyncio.wait_for(tool.fn(ctx, **args), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"{plugin.name}.{tool.name} took longer than {timeout:g} s") from None
        except KefuError:
            raise
        except Exception as exc:
            self.log.error("tool failed", plugin=plugin.name, tool=tool.name, error=f"{type(exc).__name__}: {exc}")
            raise Internal(f"{plugin.name}.{tool.name} failed") from None

    async def _check_confirmation(self, req: plugin_pb2.ToolCallRequest, tool: Tool) -> None:
        """The conversation log must hold a yes to exactly this call, by the right person, recently."""
        what = f"{req.plugin}.{req.tool} changes things"
        if not req.call_id or not req.confirmation_stream_seq or not req.conversation_id:
            raise PermissionDenied(f"{what} and runs only after its confirmation is recorded",
                                   code="confirmation_required")
        try:
            raw = await self._bus.js.get_msg(STREAM_CONV, req.confirmation_stream_seq)  # type: ignore[union-attr]
        except nats.js.errors.NotFoundError:
            raw = None
        if raw is None or raw.subject != conv_subject(req.tenant, req.conversation_id) or not raw.data:
            raise PermissionDenied(f"{what}: no confirmation of it in this conversation", code="confirmation_required")
        ev = await open_event(self.keyring, decode(events_pb2.Event, raw.data))
        c = ev.tool_confirmed
        if (ev.WhichOneof("body") != "tool_confirmed" or c.call_id != req.call_id or c.plugin != req.plugin
                or c.tool != req.tool or c.arguments_sha256 != arguments_sha256(req.arguments_json or "{}")):
            raise PermissionDenied(f"{what}: the confirmation is for another call", code="confirmation_required")
        if c.declined:
            raise PermissionDenied(f"{what}: the visitor declined it", code="confirmation_declined")
        if tool.confirmation == "agent" and not c.by.startswith("agent:"):
            raise PermissionDenied(f"{what} and needs an agent's approval", code="confirmation_required")
        if time.time() * 1000 - ev.ts_ms > CONFIRMATION_MAX_AGE_S * 1000:
            raise PermissionDenied(f"{what}: the confirmation has expired", code="confirmation_expired")

    # Hooks

    async def _hook(self, req: plugin_pb2.HookRequest, _: Msg) -> plugin_pb2.HookReply:
        if req.hook not in ("on_message", "before_reply", "after_reply"):
            raise BadRequest(f"unknown hook {req.hook!r}", code="invalid_field")
        subject_token(req.tenant)
        snap = self.registry.current
        configs = await self._configs(req.tenant, snap)
        runs = [p for p in snap.plugins.values() if req.hook in p.hooks and self._enabled(p, configs.get(p.name))]

        async def one(p: Plugin) -> plugin_pb2.HookResult:
            ctx = self._context(p, req.tenant, req.conversation_id, configs.get(p.name), lang=req.lang)
            calls = metrics.plugin_calls()
            try:
                out = await asyncio.wait_for(p.hooks[req.hook](ctx, text=req.text, reply_text=req.reply_text,
                                                               slots=dict(req.slots)), HOOK_TIMEOUT_S)
            except TimeoutError:
                calls.labels(p.name, f"hook:{req.hook}", "timeout").inc()
                return plugin_pb2.HookResult(plugin=p.name, error="timeout")
            except Exception as exc:
                calls.labels(p.name, f"hook:{req.hook}", "internal").inc()
                self.log.error("hook failed", plugin=p.name, hook=req.hook, error=f"{type(exc).__name__}: {exc}")
                return plugin_pb2.HookResult(plugin=p.name, error=type(exc).__name__)
            calls.labels(p.name, f"hook:{req.hook}", "ok").inc()
            out = out if isinstance(out, dict) else {}
            tags = [str(t)[:64] for t in out.get("tags", []) if str(t).strip()][:8]
            return plugin_pb2.HookResult(plugin=p.name, tags=tags, handoff_reason=str(out.get("handoff") or "")[:64],
                                         note=str(out.get("note") or "")[:500])

        return plugin_pb2.HookReply(results=await asyncio.gather(*(one(p) for p in runs)))


def _call_context(call_id: str) -> str:
    return f"plugin_calls/{call_id}"


def _config_context(tenant: str, plugin: str) -> str:
    return f"plugin_config/{tenant}.{plugin}"


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise BadRequest(f"{what} are not valid JSON", code="invalid_json") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object", code="invalid_json")
    return value
