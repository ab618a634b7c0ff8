"""``kefu keys generate|list|rotate`` and ``kefu audit list|verify``: encryption keys and the audit log
through the running gateway (admin token); ``keys generate`` runs here, offline."""

from __future__ import annotations

import argparse
import datetime
import json
import urllib.parse

from kefu.cli.client import Client, fail


def add_parsers(sub: argparse._SubParsersAction, client_args: object) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="encryption at rest: master key, tenants' data keys, rotation")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    ksub.add_parser("generate", help="print a new random master key (base64) for KEFU_MASTER_KEY")
    listing = ksub.add_parser("list", help="whether encryption is on, and each tenant's data key versions")
    listing.add_argument("--json", action="store_true", help="print the raw JSON answer")
    rotate = ksub.add_parser("rotate", help="re-wrap every data key under the current master key (after "
                                            "KEFU_MASTER_KEY changed, with the old key in KEFU_MASTER_KEY_OLD)")
    rotate.add_argument("--data-keys", action="store_true",
                        help="instead: a new data key version for new writes (old versions still read)")
    rotate.add_argument("--tenant", action="append", default=[], help="with --data-keys: only this tenant "
                                                                      "(repeatable; default every tenant)")
    audit = sub.add_parser("audit", help="the hash-chained log of admin actions")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    alist = asub.add_parser("list", help="the latest admin actions, oldest first")
    alist.add_argument("--limit", type=int, default=50)
    alist.add_argument("--tenant", default="", help="only this tenant's")
    alist.add_argument("--json", action="store_true", help="print the raw JSON answer")
    asub.add_parser("verify", help="walk the chain; report the first changed, missing or misplaced record")
    for p in (*ksub.choices.values(), *asub.choices.values()):
        if p.prog.split()[-1] != "generate":
            client_args(p)  # type: ignore[operator]


def run_keys(c: Client | None, args: argparse.Namespace) -> int:
    if args.keys_command == "generate":
        from kefu.shared.crypto import generate_master_key

        print(generate_master_key())
        return 0
    assert c is not None
    if args.keys_command == "list":
        status, body = c.call("GET", "/v1/keys")
        if status != 200:
            return fail(status, body)
        if args.json:
            print(json.dumps(body, ensure_ascii=False, indent=2))
            return 0
        if not body["enabled"]:
            print("encryption at rest is off (set KEFU_MASTER_KEY)")
        else:
            old = f", old {', '.join(body['old_master_key_ids'])}" if body["old_master_key_ids"] else ""
            print(f"encryption at rest is on ({body['suite']}); master key {body['master_key_id']}{old}")
        for t in body["tenants"]:
            versions = ", ".join(f"v{k['version']} {k['algorithm']} (master {k['master_key_id']})" for k in t["keys"])
            print(f"  {t['tenant']}: current v{t['current']}; {versions}")
        return 0
    payload: dict[str, object] = {"data_keys": args.data_keys}
    if args.tenant:
        payload["tenants"] = args.tenant
    status, body = c.call("POST", "/v1/keys/rotate", payload, timeout=600)
    if status != 200:
        return fail(status, body)
    if body["rotated"] == "data_keys":
        for tenant, version in sorted(body["versions"].items()):
            print(f"{tenant}: new writes use data key v{version}")
        print(f"{body['tenants']} tenants rotated; older versions still read what they sealed")
        return 0
    print(f"{body['rewrapped']} data keys re-wrapped under master key {body['master_key_id']} "
          f"({body['already']} already were; {body['tenants']} tenants).")
    for f in body["failed"]:
        print(f"  NOT ROTATED {f['tenant']}: {f['reason']}")
    if body["failed"]:
        print("Keep KEFU_MASTER_KEY_OLD (and add the missing key to it), then run `kefu keys rotate` again.")
        return 1
    print("KEFU_MASTER_KEY_OLD can now be removed.")
    return 0


def run_audit(c: Client, args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        status, body = c.call("GET", "/v1/audit/verify", timeout=600)
        if status != 200:
            return fail(status, body)
        if body["ok"]:
            print(f"ok: {body['records']} records, chain intact; head {body['head'] or '(empty log)'}")
            return 0
        p = body["problem"]
        where = f" (stream sequence {p['seq']})" if p["seq"] else ""
        print(f"TAMPERED at record {p['index']}{where}: {p['reason']}; "
              f"the {body['records']} records before it are intact")
        return 1
    query = urllib.parse.urlencode({"limit": args.limit, **({"tenant": args.tenant} if args.tenant else {})})
    status, body = c.call("GET", f"/v1/audit?{query}")
    if status != 200:
        return fail(status, body)
    if args.json:
        print(json.dumps(body, ensure_ascii=False, indent=2))
        return 0
    for r in body["records"]:
        when = datetime.datetime.fromtimestamp(r["ts_ms"] / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        facts = " ".join(f"{k}={v}" for k, v in sorted(r["details"].items()))
        where = "/".join(x for x in (r["tenant"], r["target"]) if x)
        print(f"#{r['index']} {when}Z {r['actor']} {r['action']} {where} {facts}".rstrip())
    if not body["records"]:
        print("no admin actions recorded")
    return 0
