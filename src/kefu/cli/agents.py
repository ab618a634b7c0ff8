"""``kefu agents add|list|remove``: a tenant's agent accounts, through the running gateway (admin token)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import urllib.parse

from kefu.cli.client import Client, fail


def add_parser(sub: argparse._SubParsersAction, client_args: object) -> None:  # type: ignore[type-arg]
    agents = sub.add_parser("agents", help="agent accounts of a tenant (for the agent console)")
    asub = agents.add_subparsers(dest="agents_command", required=True)
    add = asub.add_parser("add", help="create an account, or update one (a new password signs its tokens out)")
    add.add_argument("agent_id")
    add.add_argument("--tenant", required=True)
    add.add_argument("--role", choices=("agent", "admin"), default="agent",
                     help="admin also manages the tenant's accounts (default agent)")
    add.add_argument("--name", default="", help="the name the console shows")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of stdin (default: ask for it)")
    listing = asub.add_parser("list", help="the tenant's accounts")
    listing.add_argument("--tenant", required=True)
    listing.add_argument("--json", action="store_true", help="print the raw JSON answer")
    remove = asub.add_parser("remove", help="remove an account: its tokens stop working, its sockets close")
    remove.add_argument("agent_id")
    remove.add_argument("--tenant", required=True)
    for p in (add, listing, remove):
        client_args(p)  # type: ignore[operator]


def _password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.agent_id}: ")
    if getpass.getpass("again: ") != first:
        print("error: the passwords differ", file=sys.stderr)
        return None
    return first


def run(c: Client, args: argparse.Namespace) -> int:
    base = f"/v1/tenants/{urllib.parse.quote(args.tenant, safe='')}/agents"
    if args.agents_command == "list":
        status, body = c.call("GET", base)
        if status != 200:
            return fail(status, body)
        if args.json:
            print(json.dumps(body, ensure_ascii=False, indent=2))
        for a in body["agents"] if not args.json else ():
            print(f"{a['agent_id']}  {a['role']}  {a['name']}".rstrip())
        if not body["agents"] and not args.json:
            print(f"no agents in tenant {args.tenant}")
        return 0
    path = f"{base}/{urllib.parse.quote(args.agent_id, safe='')}"
    if args.agents_command == "remove":
        status, body = c.call("DELETE", path)
        if status != 200:
            return fail(status, body)
        print(f"removed {args.agent_id} from {args.tenant}")
        return 0
    password = _password(args)
    if password is None:
        return 1
    status, body = c.call("PUT", path, {"password": password, "role": args.role, "name": args.name})
    if status != 200:
        return fail(status, body)
    print(f"saved {body['agent_id']} ({body['role']}) in {body['tenant']}")
    return 0
