"""Plugin modules, their manifests, and the registry that reloads them without dropping a call.

A plugin is a Python file in the plugins directory that defines ``MANIFEST`` and one coroutine per tool
and hook. Tools and hooks get a :class:`~kefu.plugins.context.PluginContext` first (the tenant, the
plugin's settings for that tenant, the outbound HTTP client), then their arguments::

    MANIFEST = {
        "name": "crm_adapter", "version": "1.0.0", "description": "Orders and customers from the CRM",
        "settings": {"type": "object", "properties": {"base_url": {"type": "string"}}},
        "tools": [{"name": "order_status", "description": "...", "side_effecting": False,
                   "arguments": {"type": "object", "required": ["order_id"],
                                 "properties": {"order_id": {"type": "string", "pattern": "^[0-9]{6,20}$"}}}}],
        "intents": [{"tool": "order_status", "keywords": ["订单", "order"], "examples": ["查一下订单 20261124001"],
                     "slot_arguments": {"order_id": "order_id"}}],
    }

    async def order_status(ctx, order_id: str) -> dict: ...
    async def self_check(ctx) -> None: ...   # optional: raise if the plugin cannot work

A side-effecting tool (the default when ``side_effecting`` is not given) needs a confirmation:
``"visitor"`` (the default) or ``"agent"``; a read-only tool needs none.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from kefu.shared.errors import BadRequest
from kefu.shared.logging import get_logger

log = get_logger("kefu.plugins.registry")

HOOKS = ("on_message", "before_reply", "after_reply")
# Who may say yes to a side-effecting call: the visitor, in a turn of its own. (An agent's approval is
# accepted by the plugins service's check, but dialogue does not ask agents for one yet.)
CONFIRMATIONS = ("none", "visitor")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# A tool may ask for less, never for more.
MAX_TOOL_TIMEOUT_S = 30.0
DEFAULT_TOOL_TIMEOUT_S = 10.0
DEFAULT_RATE_PER_MINUTE = 60.0
SELF_CHECK_TIMEOUT_S = 10.0


class ManifestError(ValueError):
    """A plugin's MANIFEST (or the module behind it) cannot be used; the message says why."""


@dataclass(frozen=True)
class Intent:
    tool: str
    keywords: tuple[str, ...]
    examples: tuple[str, ...]
    slot_arguments: dict[str, str]
    ask_zh: str = ""
    ask_en: str = ""


@dataclass
class Tool:
    name: str
    description: str
    arguments: dict[str, Any]
    side_effecting: bool
    confirmation: str
    timeout_s: float
    rate_per_minute: float
    fn: Callable[..., Awaitable[Any]]
    confirm_zh: str = ""
    confirm_en: str = ""
    _validator: Any = None

    def __post_init__(self) -> None:
        self._validator = jsonschema.Draft202012Validator(self.arguments)

    def validate(self, args: dict[str, Any]) -> None:
        """Check ``args`` against the tool's JSON schema.

        Raises:
            BadRequest: the first violation, with where it is (``invalid_field``).
        """
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(args))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "arguments"
            raise BadRequest(f"{self.name}: {where}: {error.message}", code="invalid_field")


@dataclass
class Plugin:
    name: str
    version: str
    description: str
    path: Path
    tools: dict[str, Tool] = field(default_factory=dict)
    hooks: dict[str, Callable[..., Awaitable[Any]]] = field(default_factory=dict)
    intents: list[Intent] = field(default_factory=list)
    settings_schema: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    enabled_by_default: bool = False
    self_check: Callable[..., Awaitable[Any]] | None = None
    # SHA-256 of the file it was imported from: an unchanged file is not imported again on reload.
    source_sha256: str = ""

    def validate_settings(self, settings: dict[str, Any]) -> None:
        """Check a tenant's settings for this plugin against its settings schema.

        Raises:
            BadRequest: the first violation (``invalid_field``).
        """
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(self.settings_schema)
                                                 .iter_errors(settings))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "settings"
            raise BadRequest(f"{self.name}: {where}: {error.message}", code="invalid_field")


def _schema(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") != "object":
        raise ManifestError(f"{what} must be a JSON schema of type object")
    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except jsonschema.exceptions.SchemaError as exc:
        raise ManifestError(f"{what} is not a valid JSON schema: {exc.message}") from None
    # Arguments nobody declared are refused unless the schema says otherwise: what reaches a tool is
    # exactly what its author expected.
    return {"additionalProperties": False, **value}


def _texts(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ManifestError(f"{what} must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def parse_manifest(module: Any, path: Path) -> Plugin:
    """The :class:`Plugin` a loaded module describes.

    Raises:
        ManifestError: the manifest is missing or wrong, or names a function the module lacks.
    """
    manifest = getattr(module, "MANIFEST", None)
    if not isinstance(manifest, dict):
        raise ManifestError("the module defines no MANIFEST dict")
    name = manifest.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ManifestError("MANIFEST name must be lower-case letters, digits and _ (starting with a letter)")
    version = manifest.get("version")
    if not isinstance(version, str) or not version.strip():
        raise ManifestError("MANIFEST version must be a non-empty string")
    plugin = Plugin(name, version.strip(), str(manifest.get("description", "")), path,
                    settings_schema=_schema(manifest.get("settings", {"type": "object"}), "settings"),
                    enabled_by_default=bool(manifest.get("enabled_by_default", False)))
    for spec in manifest.get("tools", []):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
            raise ManifestError("every tool needs a name of lower-case letters, digits and _")
        tname = spec["name"]
        if tname in plugin.tools:
            raise ManifestError(f"tool {tname!r} is declared twice")
        fn = getattr(module, tname, None)
        if fn is None or not inspect.iscoroutinefunction(fn):
            raise ManifestError(f"tool {tname!r} has no async function of that name")
        side_effecting = spec.get("side_effecting", True)
        if not isinstance(side_effecting, bool):
            raise ManifestError(f"tool {tname!r}: side_effecting must be true or false")
        confirmation = spec.get("confirmation", "visitor" if side_effecting else "none")
        if confirmation not in CONFIRMATIONS:
            raise ManifestError(f"tool {tname!r}: confirmation must be one of {', '.join(CONFIRMATIONS)}")
        if side_effecting and confirmation == "none":
            # The policy outside the model: a tool that changes things always needs a person's yes.
            raise ManifestError(f"tool {tname!r} is side-effecting and must need a confirmation")
        timeout = spec.get("timeout_s", DEFAULT_TOOL_TIMEOUT_S)
        rate = spec.get("rate_per_minute", DEFAULT_RATE_PER_MINUTE)
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise ManifestError(f"tool {tname!r}: timeout_s must be a positive number")
        if not isinstance(rate, int | float) or rate <= 0:
            raise ManifestError(f"tool {tname!r}: rate_per_minute must be a positive number")
        plugin.tools[tname] = Tool(tname, str(spec.get("description", "")),
                                   _schema(spec.get("arguments", {"type": "object"}), f"tool {tname!r} arguments"),
                                   side_effecting, confirmation, min(float(timeout), MAX_TOOL_TIMEOUT_S),
                                   float(rate), fn, str(spec.get("confirm_zh", "")), str(spec.get("confirm_en", "")))
    for hook in manifest.get("hooks", []):
        if hook not in HOOKS:
            raise ManifestError(f"unknown hook {hook!r} (hooks are {', '.join(HOOKS)})")
        fn = getattr(module, hook, None)
        if fn is None or not inspect.iscoroutinefunction(fn):
            raise ManifestError(f"hook {hook!r} has no async function of that name")
        plugin.hooks[hook] = fn
    for spec in manifest.get("intents", []):
        if not isinstance(spec, dict) or spec.get("tool") not in plugin.tools:
            raise ManifestError("every intent must name one of the plugin's tools")
        slots = spec.get("slot_arguments", {})
        props = plugin.tools[spec["tool"]].arguments.get("properties", {})
        if not isinstance(slots, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in slots.items()):
            raise ManifestError("slot_arguments must map argument names to slot names")
        if unknown := [k for k in slots if k not in props]:
            raise ManifestError(f"slot_arguments names arguments the tool does not have: {unknown}")
        intent = Intent(spec["tool"], _texts(spec.get("keywords"), "keywords"), _texts(spec.get("examples"), "examples"),
                        dict(slots), str(spec.get("ask_zh", "")), str(spec.get("ask_en", "")))
        if not intent.keywords and not intent.examples:
            raise ManifestError(f"the intent of {spec['tool']!r} needs keywords or examples")
        plugin.intents.append(intent)
    check = getattr(module, "self_check", None)
    if check is not None:
        if not inspect.iscoroutinefunction(check):
            raise ManifestError("self_check must be an async function")
        plugin.self_check = check
    return plugin


def import_plugin(path: Path, generation: int) -> Plugin:
    """Import ``path`` afresh as its own module, so a new version loads beside the old one."""
    source = path.read_bytes()
    module_name = f"kefu_plugin_{path.stem}_g{generation}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ManifestError("not a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Not kept in sys.modules: the old version lives exactly as long as the calls that use it.
    sys.modules.pop(module_name, None)
    plugin = parse_manifest(module, path)
    plugin.source_sha256 = hashlib.sha256(source).hexdigest()
    return plugin


@dataclass
class LoadError:
    path: str
    error: str
    serving_version: str = ""


@dataclass
class Snapshot:
    """One consistent set of plugins: a call takes the snapshot current when it starts and finishes on it."""

    plugins: dict[str, Plugin]
    errors: list[LoadError]
    generation: int


class Registry:
    """The plugins of a directory, swapped as one set on reload.

    A reload imports every file again beside the running versions and runs each plugin's
    ``self_check``. A file that fails to import, fails its manifest or its self-check keeps its old
    version serving (if it had one) and is reported; the rest switch together, in one assignment.
    """

    def __init__(self, directory: Path | None, make_context: Callable[[Plugin], Any]) -> None:
        self.directory = directory
        self.make_context = make_context
        self.current = Snapshot({}, [], 0)
        self._lock = asyncio.Lock()
        self._imports = 0

    async def reload(self) -> Snapshot:
        async with self._lock:
            old = self.current
            by_path = {p.path: p for p in old.plugins.values()}
            plugins: dict[str, Plugin] = {}
            errors: list[LoadError] = []
            for path in self._files():
                kept = by_path.get(path)
                try:
                    if kept is not None and kept.source_sha256 == _sha256(path) and kept.name not in plugins:
                        plugins[kept.name] = kept
                        continue
                    self._imports += 1
                    # Importing runs the module's top level: off the event loop, so calls keep flowing.
                    plugin = await asyncio.to_thread(import_plugin, path, self._imports)
                    await self._check(plugin)
                    if plugin.name in plugins:
                        raise ManifestError(f"another file already defines plugin {plugin.name!r}")
                except Exception as exc:  # any failure of a plugin's own code is reported, never fatal
                    if kept is not None and kept.name not in plugins:
                        plugins[kept.name] = kept
                    errors.append(LoadError(str(path), _describe(exc), kept.version if kept else ""))
                    log.error("plugin not loaded", path=str(path), error=_describe(exc),
                              serving=kept.version if kept else None)
                    continue
                plugins[plugin.name] = plugin
            changed = _fingerprint(plugins) != _fingerprint(old.plugins) or errors != old.errors
            self.current = Snapshot(plugins, errors, old.generation + 1 if changed else old.generation)
            return self.current

    def _files(self) -> list[Path]:
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.py") if not p.name.startswith("_"))

    async def _check(self, plugin: Plugin) -> None:
        if plugin.self_check is None:
            return
        try:
            await asyncio.wait_for(plugin.self_check(self.make_context(plugin)), SELF_CHECK_TIMEOUT_S)
        except TimeoutError:
            raise ManifestError(f"self_check took longer than {SELF_CHECK_TIMEOUT_S:g} s") from None
        except Exception as exc:
            raise ManifestError(f"self_check failed: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, ManifestError) else f"{type(exc).__name__}: {text}"


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _fingerprint(plugins: dict[str, Plugin]) -> set[tuple[str, str, str]]:
    return {(p.name, p.version, p.source_sha256) for p in plugins.values()}
