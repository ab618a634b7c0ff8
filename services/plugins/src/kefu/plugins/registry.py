"""Discovering plugin modules and their manifests.

A plugin is a Python file in the plugins directory defining ``MANIFEST`` and one coroutine per tool::

    MANIFEST = {"name": "orders", "version": "1.0",
                "tools": [{"name": "order_status", "description": "...", "side_effecting": False,
                           "arguments": {"type": "object", "required": ["order_id"],
                                         "properties": {"order_id": {"type": "string"}}}}]}

    async def order_status(order_id: str) -> dict: ...
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kefu.shared.errors import BadRequest
from kefu.shared.logging import get_logger

log = get_logger("kefu.plugins.registry")

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,),
    "array": (list,),
}


@dataclass
class Tool:
    name: str
    description: str
    arguments: dict[str, Any]
    side_effecting: bool
    fn: Callable[..., Awaitable[Any]]

    def validate(self, args: dict[str, Any]) -> None:
        """Check ``args`` against the tool's (flat) JSON schema: required names, known names, types."""
        props: dict[str, Any] = self.arguments.get("properties", {})
        for name in self.arguments.get("required", []):
            if name not in args:
                raise BadRequest(f"{self.name}: missing argument {name!r}", code="missing_field")
        for name, value in args.items():
            if name not in props:
                raise BadRequest(f"{self.name}: unknown argument {name!r}", code="invalid_field")
            want = _JSON_TYPES.get(props[name].get("type", ""), (object,))
            if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
                raise BadRequest(f"{self.name}: argument {name!r} must be {props[name].get('type')}",
                                 code="invalid_field")


@dataclass
class Plugin:
    name: str
    version: str
    path: Path
    tools: dict[str, Tool] = field(default_factory=dict)


def load_plugins(directory: Path | None) -> dict[str, Plugin]:
    """Every valid plugin in ``directory``; a broken file is logged and skipped, never fatal."""
    plugins: dict[str, Plugin] = {}
    if directory is None or not directory.is_dir():
        return plugins
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            plugin = _load(path)
        except Exception as exc:
            log.error("plugin not loaded", path=str(path), error=str(exc))
            continue
        if plugin.name in plugins:
            log.error("duplicate plugin name", name=plugin.name, path=str(path))
            continue
        plugins[plugin.name] = plugin
    return plugins


def _load(path: Path) -> Plugin:
    spec = importlib.util.spec_from_file_location(f"kefu_plugin_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError("not a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    manifest = getattr(module, "MANIFEST", None)
    if not isinstance(manifest, dict) or not manifest.get("name"):
        raise ValueError("MANIFEST with a name is missing")
    plugin = Plugin(str(manifest["name"]), str(manifest.get("version", "0")), path)
    for spec_tool in manifest.get("tools", []):
        fn = getattr(module, spec_tool["name"], None)
        if fn is None or not inspect.iscoroutinefunction(fn):
            raise ValueError(f"tool {spec_tool['name']!r} has no async function")
        plugin.tools[spec_tool["name"]] = Tool(spec_tool["name"], spec_tool.get("description", ""),
                                               spec_tool.get("arguments", {"type": "object"}),
                                               bool(spec_tool.get("side_effecting", True)), fn)
    return plugin
