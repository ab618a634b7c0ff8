"""``kefu plugins list|reload|enable|disable``: plugins through the running gateway (admin token)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse

from kefu.cli.client import Client, fail


def add_parser(sub: argparse._SubParsersAction, client_args: object) -> None:  # type: ignore[type-arg]
    plugins = sub.add_parser("plugins", help="plugins: what is loaded, reload, enable for a tenant")
    psub = plugins.add_subparsers(dest="plugins_command", required=True)
    listing = psub.add_parser("list", help="the loaded plugins, enabled or not for the tenant, and load errors")
    listing.add_argument("--tenant", required=True)
    listing.add_argument("--json", action="store_true", help="print the raw JSON answer")
    psub.add_parser("reload", help="reload the plugins directory on every plugins replica (like kill -HUP)")
    enable = psub.add_parser("enable", help="enable a plugin for a tenant, with its settings")
    enable.add_argument("name")
    enable.add_argument("--tenant", required=True)
    enable.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting, e.g. --set base_url=http://crm.internal/api (repeatable)")
    disable = psub.add_parser("disable", help="disable a plugin for a tenant")
    disable.add_argument("name")
    disable.add_argument("--tenant", required=True)
    for p in psub.choices.values():
        client_args(p)  # type: ignore[operator]


def _errors(errors: list[dict]) -> None:
    for e in errors:
        kept = f"; still serving {e['serving_version']}" if e.get("serving_version") else ""
        print(f"  FAILED {e['path']}: {e['error']}{kept}")


def run(c: Client, args: argparse.Namespace) -> int:
    if args.plugins_command == "reload":
        status, body = c.call("POST", "/v1/plugins/reload")
        if status != 200:
            return fail(status, body)
        for r in body["replicas"]:
            versions = ", ".join(f"{n} {v}" for n, v in sorted(r["plugins"].items())) or "no plugins"
            print(f"{r['instance']}: {versions}")
            _errors(r["errors"])
        return 1 if any(r["errors"] for r in body["replicas"]) else 0
    base = f"/v1/tenants/{urllib.parse.quote(args.tenant, safe='')}/plugins"
    if args.plugins_command == "list":
        status, body = c.call("GET", base)
        if status != 200:
            return fail(status, body)
        if args.json:
            print(json.dumps(body, ensure_ascii=False, indent=2))
            return 0
        for p in body["plugins"]:
            tools = ", ".join(t["name"] + (" (needs confirmation)" if t["side_effecting"] else "") for t in p["tools"])
            print(f"{p['name']} {p['version']}  {'enabled' if p['enabled'] else 'disabled'}  {tools}".rstrip())
        _errors(body["errors"])
        return 0
    settings = {}
    for item in getattr(args, "set", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: --set takes KEY=VALUE, not {item!r}", file=sys.stderr)
            return 2
        settings[key] = value
    status, body = c.call("PUT", f"{base}/{urllib.parse.quote(args.name, safe='')}",
                          {"enabled": args.plugins_command == "enable", "settings": settings})
    if status != 200:
        return fail(status, body)
    print(f"{body['plugin']} {'enabled' if body['enabled'] else 'disabled'} for {body['tenant']}")
    return 0
