"""Plugins benchmark (part of `make bench`; alone: `python -m bench.plugins`): the plugins service in its
own process on a real nats-server.

- Call overhead: a trivial read-only tool called the way dialogue calls it (kefu.plugins.call: policy,
  schema check, tenant settings from KV, the tool, the reply), against a bare NATS request/reply to a
  responder that does nothing, in the same run.
- Reloads under load: 100 reloads (each a new version of the tool's file) while 50 calls a second
  flow: failed calls (the target is 0) and the time from a reload request to its answer, when every
  call after it runs the new version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench.run import write

TOOL = textwrap.dedent('''
    MANIFEST = {"name": "bench", "version": "VERSION", "enabled_by_default": True,
                "tools": [{"name": "echo", "side_effecting": False, "rate_per_minute": 10000000,
                           "arguments": {"type": "object", "properties": {"n": {"type": "integer"}}}}]}

    async def echo(ctx, n):
        return {"n": n, "version": "VERSION"}
''')


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(calls: int, reloads: int, rate: float) -> dict:
    from kefu.proto.bus.v1 import plugin_pb2
    from kefu.shared.bus import Bus
    from kefu.shared.errors import KefuError
    from kefu.shared.natsserver import NatsServer

    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "js") as nats:
        plugins = Path(tmp) / "plugins"
        plugins.mkdir()
        (plugins / "bench.py").write_text(TOOL.replace("VERSION", "0"))
        env = dict(os.environ, KEFU_NATS_URL=nats.url, KEFU_DATA_DIR=str(Path(tmp) / "data"),
                   KEFU_PLUGINS_DIR=str(plugins), KEFU_LOG_LEVEL="warning")
        proc = subprocess.Popen([sys.executable, "-m", "kefu.plugins"], env=env)  # noqa: ASYNC220 - started once
        bus = await Bus.connect([nats.url], "bench")
        try:
            req = plugin_pb2.ListPluginsRequest()
            for _ in range(300):
                try:
                    listed = await bus.request("kefu.plugins.list", req, plugin_pb2.ListPluginsReply, timeout=1)
                    if listed.plugins:
                        break
                except KefuError:
                    pass
                await asyncio.sleep(0.1)

            async def echo(msg) -> None:  # noqa: ANN001 - the baseline responder does nothing
                await msg.respond(msg.data)

            await bus.nc.subscribe("bench.raw", cb=echo)

            async def call(n: int) -> plugin_pb2.ToolCallReply:
                return await bus.request("kefu.plugins.call", plugin_pb2.ToolCallRequest(
                    tenant="shop", conversation_id="c1", plugin="bench", tool="echo", arguments_json=json.dumps({"n": n}),
                    call_id=f"c{n}-{time.monotonic_ns()}"), plugin_pb2.ToolCallReply, timeout=5)

            # Overhead: plugin calls and raw round trips alternate in blocks, so drift falls on both.
            plugin_ms: list[float] = []
            raw_ms: list[float] = []
            payload = plugin_pb2.ToolCallRequest(tenant="shop", plugin="bench", tool="echo").SerializeToString()
            for block in range(calls // 100):
                for i in range(100):
                    t0 = time.perf_counter()
                    await call(block * 100 + i)
                    plugin_ms.append((time.perf_counter() - t0) * 1000)
                for _ in range(100):
                    t0 = time.perf_counter()
                    await bus.nc.request("bench.raw", payload, timeout=5)
                    raw_ms.append((time.perf_counter() - t0) * 1000)

            # Reloads while calls flow at `rate` a second.
            failures: list[str] = []
            sent = 0
            done = asyncio.Event()
            versions_seen: dict[int, int] = {}

            async def traffic() -> None:
                nonlocal sent
                tasks = set()
                t0 = time.monotonic()
                while not done.is_set():
                    sent += 1

                    async def one(n: int) -> None:
                        try:
                            reply = await call(n)
                            v = int(json.loads(reply.result_json)["version"])
                            versions_seen[v] = versions_seen.get(v, 0) + 1
                        except Exception as exc:  # noqa: BLE001 - every failure is counted
                            failures.append(f"{type(exc).__name__}: {exc}")

                    task = asyncio.create_task(one(sent))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
                await asyncio.gather(*tasks)

            flow = asyncio.create_task(traffic())
            reload_ms: list[float] = []
            stale_after_reload = 0
            for v in range(1, reloads + 1):
                (plugins / "bench.py").write_text(TOOL.replace("VERSION", str(v)))
                t0 = time.perf_counter()
                await bus.request("kefu.plugins.reload", plugin_pb2.ReloadRequest(), plugin_pb2.ListPluginsReply,
                                  timeout=10)
                reload_ms.append((time.perf_counter() - t0) * 1000)
                reply = await call(10**9 + v)  # the first call after the reload answered
                if int(json.loads(reply.result_json)["version"]) != v:
                    stale_after_reload += 1
                await asyncio.sleep(0.05)
            done.set()
            await flow
        finally:
            await bus.close()
            proc.terminate()
            proc.wait(timeout=20)
    p50, raw50 = statistics.median(plugin_ms), statistics.median(raw_ms)
    return {
        "call_overhead": {
            "what": "kefu.plugins.call of a trivial read-only tool (policy, schema, tenant config, tool, reply)",
            "calls": len(plugin_ms), "p50_ms": round(p50, 3), "p99_ms": round(pct(plugin_ms, 0.99), 3),
            "baseline": "bare NATS request/reply to a responder that does nothing, same connection, same run",
            "baseline_p50_ms": round(raw50, 3), "baseline_p99_ms": round(pct(raw_ms, 0.99), 3),
            "added_p50_ms": round(p50 - raw50, 3), "target_p50_ms": 3.0},
        "reloads_under_load": {
            "reloads": reloads, "calls_per_second": rate, "calls_sent": sent, "failed_calls": len(failures),
            "failures": failures[:10], "target_failed_calls": 0,
            "reload_p50_ms": round(statistics.median(reload_ms), 2), "reload_p99_ms": round(pct(reload_ms, 0.99), 2),
            "reload_max_ms": round(max(reload_ms), 2),
            "first_call_after_reload_on_old_version": stale_after_reload,
            "calls_by_version_seen": len(versions_seen)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--reloads", type=int, default=100)
    ap.add_argument("--rate", type=float, default=50.0)
    args = ap.parse_args()
    write("plugins", asyncio.run(run(args.calls, args.reloads, args.rate)))


if __name__ == "__main__":
    main()
