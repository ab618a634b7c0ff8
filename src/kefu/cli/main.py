"""``kefu`` — run the stack and talk to it.

    kefu up [--http-port 8080] [--grpc-port 50051] [--nats-url URL] [--data-dir .kefu] [--services all]
    kefu models pull|list|verify [--data-dir .kefu]
    kefu models quantize SOURCE.gguf TARGET.gguf [--type Q4_K_M]
    kefu kb import PATH... --tenant T
    kefu kb search QUERY --tenant T [-k 5]
    kefu replay CONVERSATION_ID [--at-seq N]
    kefu agents add --tenant T AGENT_ID [--role admin] [--name N] [--password-stdin]
    kefu agents list --tenant T | kefu agents remove --tenant T AGENT_ID
    kefu plugins list --tenant T | reload | enable NAME --tenant T [--set KEY=VALUE] | disable NAME --tenant T
    kefu keys generate | list | rotate [--data-keys [--tenant T]]
    kefu audit list [--limit N] [--tenant T] | verify
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from pathlib import Path

from kefu.cli import agents, client, plugins, security

ALL_SERVICES = ("gateway", "dialogue", "retrieval", "inference", "plugins")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise SystemExit(f"{name} must be an integer") from None


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("KEFU_DATA_DIR", ".kefu")),
                   help="where state, logs and models live (env KEFU_DATA_DIR, default .kefu)")


def _client_args(p: argparse.ArgumentParser) -> None:
    _data_dir_arg(p)
    p.add_argument("--url", default=os.environ.get("KEFU_URL"),
                   help="gateway URL (env KEFU_URL; default: the running `kefu up` of --data-dir, else :8080)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kefu", description="kefu: self-hosted LLM customer service")
    sub = ap.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start nats (embedded unless --nats-url) and the services in the foreground")
    up.add_argument("--http-port", type=int, default=_env_int("KEFU_HTTP_PORT", 8080), help="env KEFU_HTTP_PORT")
    up.add_argument("--grpc-port", type=int, default=_env_int("KEFU_GRPC_PORT", 50051), help="env KEFU_GRPC_PORT")
    up.add_argument("--nats-url", default=os.environ.get("KEFU_NATS_URL") or None,
                    help="use this NATS (env KEFU_NATS_URL); without it an embedded nats-server starts")
    up.add_argument("--host", default=os.environ.get("KEFU_HTTP_HOST", "127.0.0.1"),
                    help="interface for HTTP and gRPC (env KEFU_HTTP_HOST)")
    _data_dir_arg(up)
    up.add_argument("--services", default=os.environ.get("KEFU_SERVICES", "all"),
                    help="comma-separated services to run here (default all: " + ",".join(ALL_SERVICES) + ")")

    models = sub.add_parser("models", help="model provisioning")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="put the default models into the models directory (offline)")
    _data_dir_arg(pull)
    listing = msub.add_parser("list", help="the models in the models directory, with sizes and checksums")
    _data_dir_arg(listing)
    check = msub.add_parser("verify", help="re-check every model against the checksums of its manifest")
    _data_dir_arg(check)
    quant = msub.add_parser("quantize", help="re-quantize a GGUF model with llama.cpp (e.g. F16 -> Q4_K_M)")
    quant.add_argument("source", type=Path, help="the GGUF model to read")
    quant.add_argument("target", type=Path, help="the GGUF file to write")
    quant.add_argument("--type", default="Q4_K_M", help="Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_M, Q4_K_S, "
                                                        "Q4_K_M (default), Q5_K_S, Q5_K_M, Q6_K or F16")

    kb = sub.add_parser("kb", help="knowledge base")
    kbsub = kb.add_subparsers(dest="kb_command", required=True)
    imp = kbsub.add_parser("import", help="import .md .txt .html .pdf .csv .json .jsonl files")
    imp.add_argument("paths", nargs="+", type=Path)
    imp.add_argument("--tenant", required=True)
    _client_args(imp)

    search = kbsub.add_parser("search", help="search a tenant's knowledge base")
    search.add_argument("query")
    search.add_argument("--tenant", required=True)
    search.add_argument("-k", type=int, default=5, help="how many hits (default 5)")
    search.add_argument("--json", action="store_true", help="print the raw JSON answer")
    _client_args(search)

    replay = sub.add_parser("replay", help="print a conversation's state as JSON, rebuilt from its events")
    replay.add_argument("conversation_id")
    replay.add_argument("--at-seq", type=int, default=None, help="the state right after event N")
    _client_args(replay)
    agents.add_parser(sub, _client_args)
    plugins.add_parser(sub, _client_args)
    security.add_parsers(sub, _client_args)
    return ap


def kb_search(c: client.Client, args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"q": args.query, "k": args.k})
    status, body = c.call("GET", f"/v1/tenants/{urllib.parse.quote(args.tenant, safe='')}/search?{query}")
    if args.json or status != 200:
        print(json.dumps(body, ensure_ascii=False, indent=2))
        return 0 if status == 200 else 1
    for i, hit in enumerate(body["hits"], 1):
        snippet = " ".join(hit["text"].split())
        print(f"{i}. [{hit['score']:.3f}] {hit['doc_id']} ({hit['chunk_id']}) {hit['title']}")
        print(f"   {snippet[:160]}{'…' if len(snippet) > 160 else ''}")
    if not body["hits"]:
        print("no hits")
    return 0


def models_command(args: argparse.Namespace) -> int:
    """kefu models list | verify | quantize."""
    from kefu.shared.models import inventory, models_dir, verify

    if args.models_command == "list":
        entries = inventory(models_dir(args.data_dir))
        for e in entries:
            checksum = f"sha256:{e.sha256[:16]}…" if e.sha256 else "not in the manifest"
            print(f"{e.name}  {e.kind or '?'}  {e.size / 2**20:.1f} MiB  {checksum}  ({e.source})")
        if not entries:
            print(f"no models in {models_dir(args.data_dir)}: run `kefu models pull`")
        return 0
    if args.models_command == "verify":
        directory = models_dir(args.data_dir)
        problems = verify(directory)
        for name, problem in problems:
            print(f"FAIL {name}: {problem}", file=sys.stderr)
        if not problems:
            print(f"all models in {directory} match their checksums")
        return 1 if problems else 0
    from kefu.inference.quantize import QuantizeError, quantize

    try:
        out = quantize(args.source, args.target, args.type)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type.upper()}); "
          f"use it with KEFU_LLM_MODEL={out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "up":
        from kefu.cli.up import up

        services = list(ALL_SERVICES) if args.services == "all" else [s.strip() for s in args.services.split(",")]
        unknown = set(services) - set(ALL_SERVICES)
        if unknown or not services:
            print(f"unknown services: {', '.join(sorted(unknown))} (choose from {', '.join(ALL_SERVICES)})",
                  file=sys.stderr)
            return 2
        return up(http_port=args.http_port, grpc_port=args.grpc_port, nats_url=args.nats_url,
                  data_dir=args.data_dir, services=services, host=args.host)
    if args.command == "models" and args.models_command != "pull":
        return models_command(args)
    if args.command == "models":
        from kefu.shared.models import ModelError, models_dir, pull

        try:
            manifest = pull(models_dir(args.data_dir))
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for name, entry in manifest.items():
            print(f"{name}  sha256:{entry['sha256'][:16]}…  ({entry['source']})")
        print(f"models are in {models_dir(args.data_dir)}")
        return 0
    if args.command == "kb" and args.kb_command == "import":
        from kefu.cli.kbimport import import_paths

        return import_paths(client.Client.for_args(args), args.tenant, args.paths)
    if args.command == "kb" and args.kb_command == "search":
        return kb_search(client.Client.for_args(args), args)
    if args.command == "agents":
        return agents.run(client.Client.for_args(args), args)
    if args.command == "plugins":
        return plugins.run(client.Client.for_args(args), args)
    if args.command == "keys":
        return security.run_keys(client.Client.for_args(args) if args.keys_command != "generate" else None, args)
    if args.command == "audit":
        return security.run_audit(client.Client.for_args(args), args)
    if args.command == "replay":
        c = client.Client.for_args(args)
        path = f"/v1/conversations/{args.conversation_id}"
        if args.at_seq is not None:
            path += f"/state?at_seq={args.at_seq}"
        status, body = c.call("GET", path)
        print(json.dumps(body, ensure_ascii=False, indent=2))
        return 0 if status == 200 else 1
    return 2
