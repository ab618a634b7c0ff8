"""python -m bench.gateway: the gateway's realtime side at scale, each figure beside its baseline from the same run.

(a) N visitor WebSockets (default 10,000; ``--quick`` 1,000) held open on one gateway process: the
    gateway's RSS before and after, and the memory per idle connection — beside a bare aiohttp
    WebSocket server (same settings, nothing else) holding the same N sockets from the same clients.
(b) Agent messages, published the way dialogue publishes them (``OutEvent`` on ``kefu.out.<cid>``), to
    random connected visitors at ``--rate`` per second: delivery latency from the publish to the
    client's receipt (p50/p95/p99), beside the same publishes straight to a NATS subscriber in the
    same client processes.
(c) HTTP overhead: ``GET /v1/conversations/{cid}`` through the gateway against the same request made
    directly over NATS (``kefu.dialogue.get``), alternating in blocks; medians and the difference.

The gateway, dialogue, nats-server and each client process run in their own processes; the clients
spread the sockets between them. Conversations and visitor tokens are real (created through the API).
On a 2-core machine run the 10k case once or twice, not in a loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLIENT_PROCESSES = 4
# Runs a service from another checkout (``--src``): the editable installs' finders point at this one.
_FROM_SRC = (
    "import runpy, sys; from pathlib import Path; root = Path(sys.argv.pop(1)); "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
    "sys.path[:0] = [str(p) for p in [root / 'shared' / 'src', *sorted((root / 'services').glob('*/src'))]]; "
    "runpy.run_module(sys.argv[1], run_name='__main__')"
)
CONNECT_CONCURRENCY = 64
TENANT = "bench"


def _raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def _latency(values_us: list[int], sent: int) -> dict[str, Any]:
    ms = [v / 1000 for v in values_us]
    return {"sent": sent, "received": len(ms), "p50_ms": round(_pct(ms, 0.5), 3), "p95_ms": round(_pct(ms, 0.95), 3),
            "p99_ms": round(_pct(ms, 0.99), 3), "max_ms": round(max(ms), 3) if ms else None}


# The bare baseline server: aiohttp, the gateway's socket settings, nothing behind it.

async def _bare_server(port: int) -> None:
    from aiohttp import web

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024, compress=False)
        await sock.prepare(request)
        async for _ in sock:
            pass
        return sock

    app = web.Application()
    app.add_routes([web.get("/v1/ws", ws), web.get("/healthz", lambda _: web.Response(text="ok"))])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# A client process: holds its share of the sockets, and times what arrives on them.

async def _client(spec: dict[str, Any]) -> None:
    import aiohttp
    import nats

    urls: list[str] = spec["urls"]
    gateway_us: list[int] = []
    direct_us: list[int] = []

    def receipt(text: str, into: list[int]) -> None:
        into.append((time.monotonic_ns() - int(text)) // 1000)

    async def hold(ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                frame = json.loads(msg.data)
                if frame.get("type") == "agent_message":
                    receipt(frame["text"], gateway_us)

    async def direct(msg: Any) -> None:
        receipt(msg.data.decode(), direct_us)

    nc = await nats.connect(spec["nats"]) if spec.get("nats") else None
    if nc is not None:
        await nc.subscribe(spec["direct_subject"], cb=direct)
        await nc.flush()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    failed = 0
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    holders: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def connect(url: str) -> None:
            nonlocal failed
            async with slots:
                for _ in range(3):
                    try:
                        ws = await session.ws_connect(url, autoping=True, compress=0, max_msg_size=0, timeout=30)
                        sockets.append(ws)
                        holders.append(asyncio.create_task(hold(ws)))
                        return
                    except (aiohttp.ClientError, OSError, TimeoutError):
                        await asyncio.sleep(0.2)
                failed += 1

        t0 = time.monotonic()
        await asyncio.gather(*(connect(u) for u in urls))
        _say({"connected": len(sockets), "failed": failed, "seconds": round(time.monotonic() - t0, 2)})
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)  # the parent says when it is done
        _say({"gateway_us": gateway_us, "direct_us": direct_us})
        for task in holders:
            task.cancel()
    if nc is not None:
        await nc.close()


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Clients:
    """The client processes of one phase, each with its share of the socket URLs."""

    def __init__(self, urls: list[str], nats_url: str = "") -> None:
        self.procs: list[subprocess.Popen[str]] = []
        share = [urls[i::CLIENT_PROCESSES] for i in range(CLIENT_PROCESSES)]
        for i, part in enumerate(share):
            proc = subprocess.Popen([sys.executable, "-m", "bench.gateway", "--client"], stdin=subprocess.PIPE,  # noqa: ASYNC220
                                    stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"urls": part, "nats": nats_url, "direct_subject": f"bench.direct.{i}"}) + "\n")
            proc.stdin.flush()
            self.procs.append(proc)

    def connected(self) -> dict[str, Any]:
        reports = [json.loads(p.stdout.readline()) for p in self.procs]  # type: ignore[union-attr]
        return {"connected": sum(r["connected"] for r in reports), "failed": sum(r["failed"] for r in reports),
                "seconds": max(r["seconds"] for r in reports)}

    def finish(self) -> tuple[list[int], list[int]]:
        gateway_us: list[int] = []
        direct_us: list[int] = []
        for p in self.procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("done\n")
            p.stdin.flush()
        for p in self.procs:
            report = json.loads(p.stdout.readline())  # type: ignore[union-attr]
            gateway_us += report["gateway_us"]
            direct_us += report["direct_us"]
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        return gateway_us, direct_us


async def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            assert proc.poll() is None, f"{proc.args} exited"
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready")
            await asyncio.sleep(0.3)


async def _settled_rss(pid: int, seconds: float = 3.0) -> int:
    """RSS once it stops moving (the last connections' buffers and tasks are in)."""
    await asyncio.sleep(1.0)
    last = _rss_kb(pid)
    for _ in range(int(seconds / 0.5)):
        await asyncio.sleep(0.5)
        now = _rss_kb(pid)
        if abs(now - last) < 256:
            return now
        last = now
    return last


async def _warm(url: str, n: int = 200) -> None:
    """Open and close some sockets first, so one-time costs (code paths, allocator arenas) are in 'before'."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        sockets = [await s.ws_connect(url) for _ in range(n)]
        await asyncio.sleep(0.5)
        for ws in sockets:
            await ws.close()


async def bare_phase(n: int) -> dict[str, Any]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.gateway", "--bare-server", str(port)],  # noqa: ASYNC220
                            cwd=Path(__file__).parent.parent)
    try:
        await _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        await _warm(f"http://127.0.0.1:{port}/v1/ws")
        before = await _settled_rss(proc.pid)
        clients = Clients([f"http://127.0.0.1:{port}/v1/ws"] * n)
        connected = await asyncio.to_thread(clients.connected)
        after = await _settled_rss(proc.pid)
        await asyncio.to_thread(clients.finish)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"what": "bare aiohttp WebSocket server, same socket settings (heartbeat 30 s, no compression)",
            "rss_before_mb": round(before / 1024, 1), "rss_after_mb": round(after / 1024, 1),
            "per_connection_kb": round((after - before) / max(1, connected["connected"]), 2), **connected}


def _service(module: str, src: Path | None) -> list[str]:
    if src is None:
        return [sys.executable, "-m", module]
    return [sys.executable, "-c", _FROM_SRC, str(src), module]


async def gateway_phase(n: int, rate: float, seconds: float, http_requests: int,
                        src: Path | None = None) -> dict[str, Any]:
    from kefu.proto.bus.v1 import turn_pb2
    from kefu.shared.bus import Bus
    from kefu.shared.natsserver import NatsServer
    from kefu.shared.streams import out_subject

    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "js") as nats_server:
        http_port = _free_port()
        env = dict(os.environ, KEFU_NATS_URL=nats_server.url, KEFU_DATA_DIR=str(Path(tmp) / "data"),
                   KEFU_LOG_LEVEL="warning", KEFU_ADMIN_TOKEN="bench-admin-token", KEFU_LLM_ENABLED="false",
                   KEFU_HTTP_PORT=str(http_port), KEFU_GRPC_PORT=str(_free_port()), KEFU_READY_SERVICES="dialogue",
                   KEFU_RATE_STARTS_PER_SECOND="1e9", KEFU_RATE_STARTS_BURST="1e9",
                   KEFU_RATE_TENANT_STARTS_PER_SECOND="1e9", KEFU_RATE_TENANT_STARTS_BURST="1e9")
        dialogue = subprocess.Popen(_service("kefu.dialogue", src), env=env)  # noqa: ASYNC220
        gateway = subprocess.Popen(_service("kefu.gateway", src), env=env)  # noqa: ASYNC220
        base = f"http://127.0.0.1:{http_port}"
        bus = await Bus.connect([nats_server.url], "bench-gateway")
        try:
            await _wait_http(f"{base}/readyz", gateway)
            t0 = time.monotonic()
            convs = await _start_conversations(base, n)
            created_s = time.monotonic() - t0
            http = await _http_overhead(base, bus, convs[0], http_requests)

            ws_urls = [f"{base}/v1/ws?token={tok}" for _, tok in convs]
            await _warm(ws_urls[0])
            before = await _settled_rss(gateway.pid)
            clients = Clients(ws_urls, nats_server.url)
            connected = await asyncio.to_thread(clients.connected)
            after = await _settled_rss(gateway.pid)

            # (b) random connected visitors at `rate` per second, then the same straight over NATS.
            cids = [cid for cid, _ in convs]

            def agent_message(stamp: int) -> tuple[str, bytes]:
                cid = random.choice(cids)
                return out_subject(cid), turn_pb2.OutEvent(conversation_id=cid, kind="agent_message", text=str(stamp),
                                                           seq=1).SerializeToString()

            def plain(stamp: int) -> tuple[str, bytes]:
                return f"bench.direct.{random.randrange(CLIENT_PROCESSES)}", str(stamp).encode()

            sent_gateway = await _paced(bus, rate, seconds, agent_message)
            sent_direct = await _paced(bus, rate, seconds, plain)
            await asyncio.sleep(2.0)  # the last ones arrive
            gateway_us, direct_us = await asyncio.to_thread(clients.finish)
            peak = _rss_kb(gateway.pid)
        finally:
            await bus.close()
            for proc in (gateway, dialogue):
                proc.terminate()
            for proc in (gateway, dialogue):
                proc.wait(30)
    return {
        "idle_memory": {"rss_before_mb": round(before / 1024, 1), "rss_after_mb": round(after / 1024, 1),
                        "per_connection_kb": round((after - before) / max(1, connected["connected"]), 2),
                        "rss_after_delivery_mb": round(peak / 1024, 1), **connected,
                        "conversations_created_per_s": round(n / created_s, 1)},
        "delivery": {"rate_per_s": rate, "seconds": seconds, **_latency(gateway_us, sent_gateway)},
        "delivery_baseline": {"what": "the same publishes to a plain NATS subscriber in the same client processes",
                              **_latency(direct_us, sent_direct)},
        "http_overhead": http,
    }


async def _start_conversations(base: str, n: int) -> list[tuple[str, str]]:
    import aiohttp

    out: list[tuple[str, str]] = []
    slots = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
        async def one() -> None:
            async with slots, s.post(f"{base}/v1/tenants/{TENANT}/conversations", json={}) as r:
                body = await r.json()
                assert r.status == 201, body
                out.append((body["conversation_id"], body["visitor_token"]))

        await asyncio.gather(*(one() for _ in range(n)))
    return out


async def _http_overhead(base: str, bus: Any, conv: tuple[str, str], requests: int) -> dict[str, Any]:
    """GET /v1/conversations/{cid} through the gateway vs kefu.dialogue.get over NATS, in alternating blocks."""
    import aiohttp

    from kefu.proto.bus.v1 import turn_pb2

    cid, token = conv
    headers = {"Authorization": f"Bearer {token}"}
    via_gateway: list[float] = []
    direct: list[float] = []
    req = turn_pb2.GetStateRequest(conversation_id=cid)
    async with aiohttp.ClientSession() as s:
        for _ in range(20):  # warm both paths (connections, caches)
            async with s.get(f"{base}/v1/conversations/{cid}", headers=headers) as r:
                await r.read()
            await bus.request("kefu.dialogue.get", req, turn_pb2.ConversationState)
        block = 50
        for _ in range(max(1, requests // block)):
            for _ in range(block):
                t0 = time.perf_counter()
                async with s.get(f"{base}/v1/conversations/{cid}", headers=headers) as r:
                    await r.read()
                    assert r.status == 200
                via_gateway.append(time.perf_counter() - t0)
            for _ in range(block):
                t0 = time.perf_counter()
                await bus.request("kefu.dialogue.get", req, turn_pb2.ConversationState)
                direct.append(time.perf_counter() - t0)
    g, d = statistics.median(via_gateway) * 1000, statistics.median(direct) * 1000
    return {"requests_each": len(via_gateway), "what": "GET /v1/conversations/{cid} (visitor token), sequential",
            "gateway_p50_ms": round(g, 3), "gateway_p90_ms": round(_pct(via_gateway, 0.9) * 1000, 3),
            "baseline_nats_p50_ms": round(d, 3), "baseline_nats_p90_ms": round(_pct(direct, 0.9) * 1000, 3),
            "overhead_p50_ms": round(g - d, 3), "target_overhead_p50_ms": 2.0}


async def _paced(bus: Any, rate: float, seconds: float, make: Any) -> int:
    """Publish ``make(stamp)`` at ``rate`` per second for ``seconds``; the stamp is the publish time."""
    total = int(rate * seconds)
    start = time.monotonic()
    sent = 0
    while sent < total:
        # Whatever is due by now goes out (the schedule, not the loop's wake-ups, sets the rate), flushed at once.
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        while sent < due:
            subject, data = make(time.monotonic_ns())
            await bus.nc.publish(subject, data)
            sent += 1
        await bus.nc.flush()
        await asyncio.sleep(max(0.001, start + sent / rate - time.monotonic()))
    return sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 sockets and 5 s of messages (a try, not the figure)")
    ap.add_argument("--sockets", type=int, default=None)
    ap.add_argument("--rate", type=float, default=1000.0, help="messages per second to random visitors")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--http-requests", type=int, default=1000)
    ap.add_argument("--src", type=Path, default=None,
                    help="run gateway and dialogue from another checkout (a worktree of an older commit) to compare; "
                         "the report then goes to gateway-SRCNAME.json")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bare-server", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    _raise_nofile()
    if args.client:
        asyncio.run(_client(json.loads(sys.stdin.readline())))
        return
    if args.bare_server:
        asyncio.run(_bare_server(args.bare_server))
        return
    n = args.sockets or (1000 if args.quick else 10_000)
    seconds = args.seconds or (5.0 if args.quick else 10.0)
    limit = _raise_nofile()
    if limit < n + 1000:
        sys.exit(f"the open-files limit is {limit}: too low for {n} sockets (raise the hard limit)")
    bare = asyncio.run(bare_phase(n))
    gw = asyncio.run(gateway_phase(n, args.rate, seconds, args.http_requests, args.src))
    from bench.run import write

    idle = gw["idle_memory"]
    write("gateway" if args.src is None else f"gateway-{args.src.name}", {
        "sockets": n, "src": str(args.src or Path(__file__).parent.parent), "client_processes": CLIENT_PROCESSES, "quick": args.quick,
        "idle_memory": {"what": "gateway RSS with N idle visitor WebSockets, per connection",
                        **idle, "target_per_connection_kb": 30},
        "idle_memory_baseline": bare,
        "delivery": {"what": "agent message (OutEvent on kefu.out.<cid>) to a random connected visitor, "
                             "publish to the client's receipt", **gw["delivery"], "target_p99_ms": 50},
        "delivery_baseline": gw["delivery_baseline"],
        "http_overhead": gw["http_overhead"],
    })


if __name__ == "__main__":
    main()
