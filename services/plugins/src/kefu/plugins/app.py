"""The plugins service: lists plugins and runs tool calls; SIGHUP reloads the plugins directory."""

from __future__ import annotations

import asyncio
import json
import signal
from contextlib import AsyncExitStack, suppress
from pathlib import Path

from nats.aio.msg import Msg
from pydantic import Field

from kefu.plugins.registry import Plugin, load_plugins
from kefu.proto.bus.v1 import plugin_pb2
from kefu.shared.bus import Bus
from kefu.shared.config import KefuSettings
from kefu.shared.errors import BadRequest, DeadlineExceeded, Internal, KefuError, NotFound, PermissionDenied
from kefu.shared.service import Service


class PluginsSettings(KefuSettings):
    plugins_dir: Path | None = None
    tool_timeout: float = Field(default=10.0, gt=0)


class PluginsService(Service):
    name = "plugins"
    settings_class = PluginsSettings
    settings: PluginsSettings

    def __init__(self, settings: PluginsSettings | None = None) -> None:
        super().__init__(settings)
        self.plugins: dict[str, Plugin] = {}

    async def start(self, bus: Bus, stack: AsyncExitStack) -> None:
        self.reload()
        loop = asyncio.get_running_loop()
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        await bus.serve("kefu.plugins.list", plugin_pb2.ListPluginsRequest, self._list, queue="plugins")
        await bus.serve("kefu.plugins.call", plugin_pb2.ToolCallRequest, self._call, queue="plugins")

    def reload(self) -> None:
        # The new set replaces the old in one assignment: calls in flight keep the tool they started with.
        self.plugins = load_plugins(self.settings.plugins_dir)
        self.log.info("plugins loaded", plugins=sorted(self.plugins))

    def health_details(self) -> dict[str, str]:
        return {"plugins": ",".join(sorted(self.plugins))}

    async def _list(self, _: plugin_pb2.ListPluginsRequest, __: Msg) -> plugin_pb2.ListPluginsReply:
        reply = plugin_pb2.ListPluginsReply()
        for p in self.plugins.values():
            info = reply.plugins.add(name=p.name, version=p.version)
            for t in p.tools.values():
                info.tools.add(name=t.name, description=t.description, arguments_schema=json.dumps(t.arguments),
                               side_effecting=t.side_effecting)
        return reply

    async def _call(self, req: plugin_pb2.ToolCallRequest, _: Msg) -> plugin_pb2.ToolCallReply:
        plugin = self.plugins.get(req.plugin)
        tool = plugin.tools.get(req.tool) if plugin else None
        if tool is None:
            raise NotFound(f"no tool {req.plugin}.{req.tool}")
        if tool.side_effecting and not req.confirmation:
            # The model never gets here alone: the dialogue policy must have obtained a confirmation.
            raise PermissionDenied(f"{req.plugin}.{req.tool} changes things and needs a confirmation")
        try:
            args = json.loads(req.arguments_json or "{}")
        except ValueError:
            raise BadRequest("arguments are not valid JSON", code="invalid_json") from None
        if not isinstance(args, dict):
            raise BadRequest("arguments must be a JSON object", code="invalid_json")
        tool.validate(args)
        try:
            result = await asyncio.wait_for(tool.fn(**args), self.settings.tool_timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"{req.plugin}.{req.tool} took longer than {self.settings.tool_timeout}s") from None
        except KefuError:
            raise
        except Exception as exc:
            self.log.error("tool failed", plugin=req.plugin, tool=req.tool, error=str(exc))
            raise Internal(f"{req.plugin}.{req.tool} failed") from None
        return plugin_pb2.ToolCallReply(result_json=json.dumps(result, ensure_ascii=False, default=str))
