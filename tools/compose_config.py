"""Validate docker-compose.yml the way `docker compose config` does, without Docker: offline, in CI.

The file is parsed and type-checked against the Compose Specification by the ``compose_spec`` Rust
library (PyPI ``compose-spec``; unknown keys, wrong types, bad durations and enum values are errors),
with YAML merge keys applied; then what `docker compose config` also refuses is checked here: a
service, volume, network or secret used but never declared, a ``build`` whose context or Dockerfile
does not exist. kefu's own rules follow (every kefu service read-only, with a /healthz health check, on
NATS with JetStream).

    python tools/compose_config.py [docker-compose.yml]    # prints the resolved file; exit 1 on errors
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from compose_spec import PyOptions

KEFU_SERVICES = ("gateway", "dialogue", "retrieval", "inference", "plugins")


def resolve(text: str) -> dict[str, Any]:
    """The file as `docker compose config` would see it (merge keys applied); ValueError when invalid."""
    compose = PyOptions(apply_merge=True).from_yaml(text)
    compose.validate()
    return compose.to_dict()


def problems(text: str, root: Path) -> list[str]:
    """Everything wrong with the compose file ``text`` (relative paths from ``root``); empty when valid."""
    try:
        spec = resolve(text)
    except ValueError as exc:
        return [f"not a valid Compose file: {exc}"]
    out: list[str] = []
    services: dict[str, dict[str, Any]] = spec.get("services") or {}
    declared = {kind: set((spec.get(kind) or {}).keys()) for kind in ("volumes", "networks", "secrets", "configs")}
    for name, svc in services.items():
        for dep in _keys(svc.get("depends_on")):
            if dep not in services:
                out.append(f"service {name} depends on undefined service {dep}")
        for volume in svc.get("volumes") or []:
            if isinstance(volume, dict):
                source = volume.get("source", "") if volume.get("type", "volume") == "volume" else ""
            else:  # short form: "name:/path[:ro]" names a volume; "./dir:/path" and "/path" do not
                source = volume.split(":", 1)[0] if ":" in volume else ""
            if source and not source.startswith((".", "/", "~", "$")) and source not in declared["volumes"]:
                out.append(f"service {name} uses undefined volume {source}")
        for kind in ("networks", "secrets", "configs"):
            for used in _keys(svc.get(kind)):
                if kind == "networks" and used == "default":
                    continue
                if used not in declared[kind]:
                    out.append(f"service {name} uses undefined {kind[:-1]} {used}")
        build = svc.get("build")
        if isinstance(build, dict):
            context = root / build.get("context", ".")
            if not context.is_dir():
                out.append(f"service {name}: build context {context} does not exist")
            elif not (context / build.get("dockerfile", "Dockerfile")).is_file():
                out.append(f"service {name}: no Dockerfile {build.get('dockerfile', 'Dockerfile')} in {context}")
    nats = services.get("nats", {})
    if "-js" not in (nats.get("command") or []):
        out.append("nats must run with JetStream (-js)")
    for name in KEFU_SERVICES:
        svc = services.get(name)
        if svc is None:
            out.append(f"service {name} is missing")
            continue
        test = " ".join((svc.get("healthcheck") or {}).get("test") or [])
        if "/healthz" not in test:
            out.append(f"service {name} has no health check on /healthz")
        if svc.get("read_only") is not True:
            out.append(f"service {name} must have a read-only root filesystem")
        if (svc.get("depends_on") or {}).get("nats", {}).get("condition") != "service_healthy":
            out.append(f"service {name} must wait for a healthy nats")
    return out


def _keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return list(value)
    return [v if isinstance(v, str) else v.get("source", "") for v in value or []]


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "docker-compose.yml")
    text = path.read_text()
    found = problems(text, path.parent)
    for problem in found:
        print(f"{path}: {problem}", file=sys.stderr)
    if found:
        return 1
    print(PyOptions(apply_merge=True).from_yaml(text).to_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
