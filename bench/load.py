"""python -m bench.load: kefu under load from visitor WebSockets and HTTP (SSE), each figure beside a baseline
from the same run.

The stack runs as separate processes (nats-server, retrieval, plugins, and 1 or 2 replicas each of
gateway, dialogue and, on the generation path, inference), so each service's memory and CPU are read from
/proc. The knowledge base is the 64 documents of bench/data/retrieval; visitors ask its 163 labelled
questions (English and Chinese). Sessions are closed loops spread over the gateways: a visitor starts a
conversation (HTTP), opens a WebSocket (75 % of them) or uses HTTP with SSE, sends a question, waits for
the reply, thinks (exponential, mean ``--think``), asks again, until the phase ends; every turn in flight
then finishes. Afterwards each conversation is read back: every acknowledged message stored once, at its
seq, with its reply; seqs strictly increasing.

Phases (the same broker, retrieval and plugins; gateway, dialogue and inference restarted for each):

- ``faq``: generation off (``KEFU_LLM_ENABLED=false``): the reply is the cited sentence from the KB.
  Baselines, with the stack idle right after: the same questions as bare ``kefu.retrieval.search``
  requests over NATS (the turn's one unavoidable step), and ``GET /healthz`` on the gateway (its bare HTTP
  round trip), each sequentially (latency) and with as many in flight as the phase had (throughput).
- ``gen``: generation on with the bundled model (SmolLM2-135M Q4_1). Baseline: the very prompt dialogue
  built (a job taken off ``kefu.llm.generate`` during the phase), with the stack idle, on raw
  llama-cpp-python (``bench.run``'s measurement) and through one idle inference replica
  (``bench.inference``'s timed job), run by turns: time to first token and tokens/s.

each with 1 and 2 replicas (inference: one thread per core on one replica, split between two: the load
generator and every service share the machine's cores, so a second replica adds parallelism, not cores).
The gateway's rate limits are lifted (the generator is one client address).

Writes bench/results/load.json. ``--quick`` tries it on a few sessions for a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "retrieval"
TENANT = "load"
ADMIN = "bench-load-admin-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
# Every limit of the gateway, lifted: the generator is one client address.
NO_LIMITS = {f"KEFU_RATE_{k}_{x}": "1e9" for k in ("MESSAGES", "IP_MESSAGES", "TENANT_MESSAGES", "STARTS",
                                                    "TENANT_STARTS") for x in ("PER_SECOND", "BURST")}


def kb_documents(limit: int | None = None) -> list[dict[str, str]]:
    docs = [json.loads(line) for line in (DATA / "kb.jsonl").read_text().splitlines() if line.strip()]
    return docs[:limit]


def questions(doc_ids: set[str] | None = None) -> list[str]:
    """The labelled questions (of the given documents only, when named)."""
    rows = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line.strip()]
    return [r["question"] for r in rows if doc_ids is None or set(r["doc_ids"]) & doc_ids]


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def latency_ms(values_s: list[float]) -> dict[str, Any]:
    return {"n": len(values_s), "p50_ms": _ms(pct(values_s, 0.5)), "p95_ms": _ms(pct(values_s, 0.95)),
            "p99_ms": _ms(pct(values_s, 0.99)), "max_ms": _ms(max(values_s) if values_s else None)}


# The load generator: visitors over the public API only (CONTRACT.md).

@dataclass
class Turn:
    transport: str  # "ws" or "http" (SSE)
    sent_at: float  # monotonic
    latency_s: float
    ttft_s: float | None  # first delta
    code: str  # "ok" or the error's code (the API's, or client_timeout / connection_error)
    source: str = ""
    seq: int = 0
    reply_seq: int = 0
    text: str = ""
    citations: tuple[str, ...] = ()


@dataclass
class Session:
    transport: str
    base: str = ""
    cid: str = ""
    token: str = ""
    turns: list[Turn] = field(default_factory=list)
    start_error: str = ""
    open_at_end: bool = False


@dataclass
class LoadRun:
    sessions: list[Session]
    seconds: float  # from the first message sent to the last reply
    started_at: float
    ended_at: float
    peak_in_flight: int
    peak_open: int

    @property
    def turns(self) -> list[Turn]:
        return [t for s in self.sessions for t in s.turns]


def _error_code(body: Any, status: int) -> str:
    try:
        return str(body["error"]["code"])
    except (KeyError, TypeError):
        return f"http_{status}"


async def run_load(bases: list[str], tenant: str, texts: list[str], *, sessions: int, seconds: float,
                   ws_share: float = 0.75, think_s: float = 2.0, timeout_s: float = 60.0, ramp_s: float = 1.0,
                   seed: int = 1, turns_per_session: int | None = None) -> LoadRun:
    """Drive ``sessions`` visitors (spread over the gateways at ``bases``) for ``seconds``; every turn
    started finishes (or times out) before this returns. With ``turns_per_session`` a visitor leaves
    after that many turns and a new one takes its place (a soak's conversations come and go); without,
    each visitor holds its conversation (and socket) for the whole run."""
    import aiohttp

    rng = random.Random(seed)
    all_sessions: list[Session] = []
    in_flight = peak_in_flight = open_now = peak_open = 0
    first_sent: list[float] = []
    deadline = 0.0

    async def turn_ws(ws: Any, text: str, cmid: str) -> Turn:
        t0 = time.monotonic()
        await ws.send_json({"type": "message", "text": text, "client_msg_id": cmid})
        ttft = None
        while True:
            msg = await ws.receive(timeout=max(0.1, t0 + timeout_s - time.monotonic()))
            if msg.type != aiohttp.WSMsgType.TEXT:
                return Turn("ws", t0, time.monotonic() - t0, ttft, "connection_error", text=text)
            frame = json.loads(msg.data)
            if frame["type"] == "delta" and ttft is None:
                ttft = time.monotonic() - t0
            elif frame["type"] == "reply":
                reply = frame["reply"]
                return Turn("ws", t0, time.monotonic() - t0, ttft, "ok", reply["source"], frame["seq"],
                            frame.get("reply_seq", 0), text, tuple(reply.get("citations", ())))
            elif frame["type"] == "error":
                return Turn("ws", t0, time.monotonic() - t0, ttft, frame["code"], text=text)

    async def turn_http(http: Any, sess: Session, text: str, cmid: str) -> Turn:
        t0 = time.monotonic()
        ttft, event = None, ""
        async with http.post(f"{sess.base}/v1/conversations/{sess.cid}/messages",
                             json={"text": text, "client_msg_id": cmid},
                             headers={"Authorization": f"Bearer {sess.token}", "Accept": "text/event-stream"}) as r:
            if r.status != 200:
                try:
                    body = await r.json()
                except (ValueError, aiohttp.ContentTypeError):
                    body = None
                return Turn("http", t0, time.monotonic() - t0, None, _error_code(body, r.status), text=text)
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                    if event == "delta" and ttft is None:
                        ttft = time.monotonic() - t0
                elif line.startswith("data: ") and event in ("done", "error"):
                    data = json.loads(line[6:])
                    if event == "error":
                        return Turn("http", t0, time.monotonic() - t0, ttft, data["code"], text=text)
                    reply = data["reply"]
                    return Turn("http", t0, time.monotonic() - t0, ttft, "ok", reply["source"], data["seq"],
                                data.get("reply_seq", 0), text, tuple(reply.get("citations", ())))
        return Turn("http", t0, time.monotonic() - t0, ttft, "connection_error", text=text)

    async def conversation(sess: Session, http: Any) -> None:
        nonlocal in_flight, peak_in_flight, open_now, peak_open
        try:
            async with http.post(f"{sess.base}/v1/tenants/{tenant}/conversations", json={}) as r:
                body = await r.json()
                if r.status != 201:
                    sess.start_error = _error_code(body, r.status)
                    return
            sess.cid, sess.token = body["conversation_id"], body["visitor_token"]
            ws = await http.ws_connect(f"{sess.base}/v1/ws?token={sess.token}") if sess.transport == "ws" else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            sess.start_error = f"connection_error: {type(exc).__name__}"
            return
        open_now += 1
        peak_open = max(peak_open, open_now)
        try:
            while time.monotonic() < deadline and (turns_per_session is None or len(sess.turns) < turns_per_session):
                text = rng.choice(texts)
                cmid = f"{sess.cid}-{len(sess.turns)}"
                in_flight += 1
                peak_in_flight = max(peak_in_flight, in_flight)
                if not first_sent:
                    first_sent.append(time.monotonic())
                try:
                    t = await asyncio.wait_for(turn_ws(ws, text, cmid) if ws is not None
                                               else turn_http(http, sess, text, cmid), timeout_s)
                except TimeoutError:
                    t = Turn(sess.transport, time.monotonic() - timeout_s, timeout_s, None, "client_timeout", text=text)
                except (aiohttp.ClientError, OSError) as exc:
                    t = Turn(sess.transport, time.monotonic(), 0.0, None, f"connection_error: {type(exc).__name__}",
                             text=text)
                finally:
                    in_flight -= 1
                sess.turns.append(t)
                if t.code in ("client_timeout", "connection_error") and ws is not None:
                    break  # a late frame of this turn would be read as the next one's
                await asyncio.sleep(min(rng.expovariate(1 / think_s) if think_s > 0 else 0,
                                        max(0.0, deadline - time.monotonic())))
            sess.open_at_end = turns_per_session is None and (ws is None or not ws.closed)
        finally:
            open_now -= 1
            if ws is not None:
                await ws.close()

    async def visitor(i: int, http: Any) -> None:
        await asyncio.sleep(ramp_s * i / max(1, sessions))
        transport = "ws" if i < round(sessions * ws_share) else "http"
        while time.monotonic() < deadline:
            sess = Session(transport, bases[i % len(bases)])
            all_sessions.append(sess)
            await conversation(sess, http)
            if turns_per_session is None:
                break
            if sess.start_error:
                await asyncio.sleep(1.0)  # refused (a limit, a restart): no tight loop

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:
        started = time.monotonic()
        deadline = started + ramp_s + seconds
        await asyncio.gather(*(visitor(i, http) for i in range(sessions)))
        ended = time.monotonic()
    turns = [t for s in all_sessions for t in s.turns]
    last = max((t.sent_at + t.latency_s for t in turns), default=ended)
    begin = first_sent[0] if first_sent else started
    return LoadRun(all_sessions, max(1e-9, last - begin), started, ended, peak_in_flight, peak_open)


async def check_stored(admin: str, run: LoadRun) -> dict[str, Any]:
    """Read every conversation back: each acknowledged message stored once at the seq it was answered
    with, its reply stored too, the seqs strictly increasing."""
    import aiohttp

    lost = duplicated = missing_replies = extra = unordered = visitor_messages = 0
    slots = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as http:
        async def one(sess: Session) -> None:
            nonlocal lost, duplicated, missing_replies, extra, unordered, visitor_messages
            async with slots, http.get(f"{sess.base}/v1/conversations/{sess.cid}",
                                       headers={"Authorization": f"Bearer {admin}"}) as r:
                state = await r.json()
            seqs = [t["seq"] for t in state["turns"]]
            unordered += any(b <= a for a, b in zip(seqs, seqs[1:], strict=False))
            stored = [(t["seq"], t["text"]) for t in state["turns"] if t["role"] == "visitor"]
            at = set(stored)
            visitor_messages += len(stored)
            replies = {t["seq"] for t in state["turns"] if t["role"] == "bot"}
            for t in sess.turns:
                if t.code == "ok":
                    lost += (t.seq, t.text) not in at
                    missing_replies += t.reply_seq not in replies
            # A text stored more often than it was sent is a duplicated turn; messages that ended in an
            # error may or may not have been stored, but never more than were sent.
            sent = Counter(t.text for t in sess.turns)
            duplicated += sum(max(0, n - sent[text]) for text, n in Counter(x for _, x in stored).items())
            extra += max(0, len(stored) - len(sess.turns))

        await asyncio.gather(*(one(s) for s in run.sessions if s.cid))
    return {"acknowledged": sum(t.code == "ok" for t in run.turns), "lost": lost, "duplicated": duplicated,
            "acknowledged_without_stored_reply": missing_replies, "stored_beyond_sent": extra,
            "conversations_out_of_order": unordered, "stored_visitor_messages": visitor_messages}


def summarize(run: LoadRun) -> dict[str, Any]:
    """The figures of one run: sessions, turns/s, latency and time to first token, errors by code."""
    turns = run.turns
    ok = [t for t in turns if t.code == "ok"]
    errors = Counter(t.code for t in turns if t.code != "ok")
    starts = Counter(s.start_error for s in run.sessions if s.start_error)
    by_transport = {}
    for tr in ("ws", "http"):
        mine = [t for t in ok if t.transport == tr]
        by_transport[tr] = {"turns": len(mine), "latency": latency_ms([t.latency_s for t in mine]),
                            "ttft": latency_ms([t.ttft_s for t in mine if t.ttft_s is not None])}
    # Held: a visitor socket open from its start to the end of the run, every one of its turns answered.
    held = [s for s in run.sessions if s.transport == "ws" and s.open_at_end and s.turns
            and all(t.code == "ok" for t in s.turns)]
    return {
        "sessions": {"conversations": len(run.sessions), "started": sum(bool(s.cid) for s in run.sessions),
                     "ws_held_and_answered": len(held),
                     "held_at_end": sum(s.open_at_end for s in run.sessions),
                     "peak_open": run.peak_open, "start_errors": dict(starts)},
        "turns": {"sent": len(turns), "ok": len(ok), "errors": sum(errors.values()),
                  "errors_by_code": dict(errors), "peak_in_flight": run.peak_in_flight,
                  "sources": dict(Counter(t.source for t in ok)),
                  "ok_without_citation": sum(not t.citations for t in ok)},
        "seconds": round(run.seconds, 3),
        "turns_per_s": round(len(ok) / run.seconds, 2),
        "latency": latency_ms([t.latency_s for t in ok]),
        "ttft": latency_ms([t.ttft_s for t in ok if t.ttft_s is not None]),
        "by_transport": by_transport,
    }


# Resource use of the processes, from /proc.

def _proc(pid: int) -> tuple[int, float]:
    """(RSS in KB, CPU seconds used) of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return int(fields[21]) * PAGE_KB, cpu


class Usage:
    """Samples RSS and CPU of named groups of processes (a service's replicas) while a phase runs; the
    samples are kept (``series``: seconds since the start, RSS in MB per group)."""

    def __init__(self, groups: dict[str, list[int]], every_s: float = 1.0) -> None:
        self.groups = groups
        self.every_s = every_s
        self.peak: dict[str, int] = dict.fromkeys(groups, 0)
        self.series: list[tuple[float, dict[str, float]]] = []
        self.load: list[float] = []  # the 1-minute load average at each sample
        self._cpu0: dict[int, float] = {}
        self._t0 = 0.0
        self._task: asyncio.Task[None] | None = None

    def _rss(self, name: str) -> int:
        return sum(_proc(pid)[0] for pid in self.groups[name])

    async def _sample(self) -> None:
        while True:
            row = {}
            for name in self.groups:
                with contextlib.suppress(OSError):
                    rss = self._rss(name)
                    self.peak[name] = max(self.peak[name], rss)
                    row[name] = round(rss / 1024, 2)
            self.series.append((round(time.monotonic() - self._t0, 2), row))
            self.load.append(os.getloadavg()[0])
            await asyncio.sleep(self.every_s)

    def __enter__(self) -> Usage:
        self._t0 = time.monotonic()
        self._cpu0 = {pid: _proc(pid)[1] for pids in self.groups.values() for pid in pids}
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        wall = time.monotonic() - self._t0
        self.result: dict[str, Any] = {}
        for name, pids in self.groups.items():
            rss, cpu = zip(*(_proc(pid) for pid in pids), strict=True)
            used = sum(cpu) - sum(self._cpu0[pid] for pid in pids)
            self.result[name] = {"replicas": len(pids), "rss_mb": round(sum(rss) / 1024, 1),
                                 "rss_peak_mb": round(max(self.peak[name], sum(rss)) / 1024, 1),
                                 "cpu_cores": round(used / wall, 3), "cpu_s": round(used, 2)}

    @property
    def load_average(self) -> dict[str, float | None]:
        """The machine's 1-minute load average over the phase (every process on it, not only kefu's)."""
        return {"median": round(statistics.median(self.load), 2) if self.load else None,
                "max": round(max(self.load), 2) if self.load else None}


# The stack, each service its own process.

def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark's process dies, however it dies (no orphans)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

class Stack:
    """nats-server, retrieval and plugins for the whole run; gateway, dialogue and inference replicas
    started per phase. Each process serves its metrics (and /readyz) on a port of its own."""

    def __init__(self, tmp: Path, ready_services: str = "dialogue,retrieval") -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.metrics: dict[int, int] = {}  # pid -> metrics port
        self.http_ports: dict[int, int] = {}  # gateway pid -> HTTP port
        self.grpc_ports: dict[int, int] = {}  # gateway pid -> gRPC port
        self.ready_services = ready_services
        self.nats: Any = None

    async def __aenter__(self) -> Stack:
        from kefu.shared.models import models_dir, pull
        from kefu.shared.natsserver import NatsServer

        pull(models_dir(self.data))
        self.nats = NatsServer(self.tmp / "js").start()
        self.env = dict(os.environ, KEFU_NATS_URL=self.nats.url, KEFU_DATA_DIR=str(self.data), KEFU_LOG_LEVEL="warning",
                        KEFU_ADMIN_TOKEN=ADMIN, KEFU_READY_SERVICES=self.ready_services, KEFU_OCR_ENABLED="false",
                        **NO_LIMITS)
        self.env.pop("KEFU_MASTER_KEY", None)  # jobs in clear: the tap below reads the prompt
        for name in ("retrieval", "plugins"):
            self.start(name)
        await self.ready(["retrieval", "plugins"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for name in list(self.procs):
            self.stop_all(name)
        if self.nats is not None:
            self.nats.stop()

    @property
    def bases(self) -> list[str]:
        """The gateways' HTTP base URLs."""
        return [f"http://127.0.0.1:{self.http_ports[p.pid]}" for p in self.procs.get("gateway", [])]

    @property
    def base(self) -> str:
        return self.bases[0]

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        from kefu.shared.natsserver import free_port

        port = free_port()
        extra = {"KEFU_METRICS_PORT": str(port)}
        if name == "gateway":
            extra |= {"KEFU_HTTP_PORT": str(free_port()), "KEFU_GRPC_PORT": str(free_port())}
        log = open(self.tmp / f"{name}-{len(self.procs.get(name, []))}.log", "ab")  # noqa: SIM115 - the child's
        proc = subprocess.Popen([sys.executable, "-m", f"kefu.{name}"], stdout=log, stderr=subprocess.STDOUT,
                                env={**self.env, **extra, **env}, preexec_fn=_die_with_parent)
        self.procs.setdefault(name, []).append(proc)
        self.metrics[proc.pid] = port
        if name == "gateway":
            self.http_ports[proc.pid] = int(extra["KEFU_HTTP_PORT"])
            self.grpc_ports[proc.pid] = int(extra["KEFU_GRPC_PORT"])
        return proc

    def stop_all(self, name: str) -> None:
        procs = self.procs.pop(name, [])
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pids(self) -> dict[str, list[int]]:
        groups = {name: [p.pid for p in procs] for name, procs in self.procs.items()}
        if self.nats is not None and self.nats.proc is not None:
            groups["nats-server"] = [self.nats.proc.pid]
        return groups

    async def ready(self, names: list[str], timeout: float = 180.0) -> None:
        """Until every replica of ``names`` answers /readyz on its own metrics port."""
        import aiohttp

        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            for name in names:
                for i, proc in enumerate(self.procs[name]):
                    while True:
                        if proc.poll() is not None:
                            log = (self.tmp / f"{name}-{i}.log").read_text()[-2000:]
                            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{log}")
                        with contextlib.suppress(aiohttp.ClientError):
                            async with http.get(f"http://127.0.0.1:{self.metrics[proc.pid]}/readyz") as r:
                                if r.status == 200:
                                    break
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{name} not ready in {timeout} s")
                        await asyncio.sleep(0.3)

    async def phase(self, path: str, replicas: int, cores: int, **dialogue_env: str) -> None:
        """(Re)start ``replicas`` each of gateway, dialogue and, for the generation path, inference."""
        for name in ("gateway", "dialogue", "inference"):
            self.stop_all(name)
        threads = str(max(1, cores // replicas))
        for _ in range(replicas):
            self.start("dialogue", **{"KEFU_LLM_ENABLED": str(path == "gen").lower(), **dialogue_env})
            if path == "gen":
                self.start("inference", KEFU_LLM_THREADS=threads)
        await self.ready(["dialogue", *(["inference"] if path == "gen" else [])])
        for _ in range(replicas):
            self.start("gateway")
        await self.ready(["gateway"])

    async def scrape(self, name: str) -> dict[str, float]:
        """kefu's metrics of ``name``'s replicas, summed: by sample name (labels dropped), and by sample name
        with its labels (``kefu_errors_total{code="rate_limited",service="gateway"}``)."""
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        out: Counter[str] = Counter()
        async with aiohttp.ClientSession() as http:
            for proc in self.procs.get(name, []):
                async with http.get(f"http://127.0.0.1:{self.metrics[proc.pid]}/metrics") as r:
                    text = await r.text()
                for fam in text_string_to_metric_families(text):
                    for s in fam.samples:
                        if s.name.startswith("kefu_") and not s.labels.get("le"):
                            out[s.name] += s.value
                            if s.labels:
                                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                                out[f"{s.name}{{{labels}}}"] += s.value
        return dict(out)


async def import_kb(base: str, tenant: str, docs: list[dict[str, str]]) -> None:
    import aiohttp

    slots = asyncio.Semaphore(8)
    async with aiohttp.ClientSession() as http:
        async def put(doc: dict[str, str]) -> None:
            async with slots, http.put(f"{base}/v1/tenants/{tenant}/documents/{doc['doc_id']}",
                                       headers={"Authorization": f"Bearer {ADMIN}"},
                                       json={"title": doc["title"], "text": doc["text"]}) as r:
                assert r.status == 200, await r.text()

        await asyncio.gather(*(put(d) for d in docs))
        # Answerable once searchable: the last document's title finds it.
        deadline = time.monotonic() + 120
        while True:
            async with http.get(f"{base}/v1/tenants/{tenant}/search", params={"q": docs[-1]["title"], "k": "3"},
                                headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                if r.status == 200 and any(h["doc_id"] == docs[-1]["doc_id"] for h in (await r.json())["hits"]):
                    return
            assert time.monotonic() < deadline, "the KB never became searchable"
            await asyncio.sleep(0.5)


# Baselines.

async def search_baseline(nats_url: str, tenant: str, texts: list[str], n: int, concurrency: int,
                          seconds: float) -> dict[str, Any]:
    """The FAQ turn's one unavoidable step alone: ``kefu.retrieval.search`` over NATS, as dialogue asks it
    (k=12), sequentially (latency) and closed-loop with ``concurrency`` in flight (throughput)."""
    from kefu.proto.bus.v1 import retrieval_pb2
    from kefu.shared.bus import Bus

    bus = await Bus.connect([nats_url], "bench-load")
    rng = random.Random(2)

    async def one() -> float:
        t0 = time.perf_counter()
        await bus.request("kefu.retrieval.search", retrieval_pb2.SearchRequest(tenant=tenant, query=rng.choice(texts),
                                                                               k=12), retrieval_pb2.SearchReply,
                          timeout=30)
        return time.perf_counter() - t0

    try:
        sequential, done, wall = await sequential_then_closed_loop(one, n, concurrency, seconds)
    finally:
        await bus.close()
    return {"what": "bare kefu.retrieval.search over NATS (k=12), the same questions, stack otherwise idle",
            "sequential": latency_ms(sequential), "concurrency": concurrency,
            "concurrent": {**latency_ms(done), "searches_per_s": round(len(done) / wall, 2)}}


async def sequential_then_closed_loop(one: Callable[[], Awaitable[float]], n: int, concurrency: int,
                                     seconds: float) -> tuple[list[float], list[float], float]:
    """A baseline's timings: 5 warm-up calls of ``one``, ``n`` one after another, then ``concurrency``
    closed loops for ``seconds``; returns (sequential, concurrent, the loops' wall seconds)."""
    for _ in range(5):
        await one()
    sequential = [await one() for _ in range(n)]
    done: list[float] = []
    end = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < end:
            done.append(await one())

    t0 = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(max(1, concurrency))))
    return sequential, done, time.monotonic() - t0


async def healthz_baseline(base: str, n: int, concurrency: int, seconds: float) -> dict[str, Any]:
    """The gateway's bare HTTP round trip: ``GET /healthz`` (no NATS, no turn), sequentially and closed-loop
    with ``concurrency`` in flight."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one() -> float:
            t0 = time.perf_counter()
            async with http.get(f"{base}/healthz") as r:
                await r.read()
                assert r.status == 200
            return time.perf_counter() - t0

        sequential, done, wall = await sequential_then_closed_loop(one, n, concurrency, seconds)
    return {"what": "GET /healthz on the gateway, stack otherwise idle", "sequential": latency_ms(sequential),
            "concurrency": concurrency, "concurrent": {**latency_ms(done), "requests_per_s": round(len(done) / wall, 2)}}


async def engine_baseline(stack: Stack, model: Path, messages: list[dict[str, str]], max_tokens: int, threads: int,
                          runs: int) -> dict[str, Any]:
    """The prompt dialogue built, with the stack idle: raw llama-cpp-python (bench.run's measurement) and
    one inference replica (bench.inference's timed job over the work queue), run by turns."""
    from bench.inference import timed_job
    from bench.run import _raw_once
    from kefu.inference.backend import open_llama
    from kefu.shared.bus import Bus

    stack.start("inference", KEFU_LLM_THREADS=str(threads))
    await stack.ready(["inference"])
    # Like the service, the engine keeps its context between calls, so the prompt prefix is reused.
    llm = open_llama(str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    bus = await Bus.connect([stack.nats.url], "bench-load")
    raw: dict[str, list[float]] = {"ttft": [], "tps": [], "gen_tps": [], "tokens": []}
    svc: dict[str, list[float]] = {"ttft": [], "tps": [], "gen_tps": [], "tokens": []}
    try:
        _raw_once(llm, messages, max_tokens)  # warm both: the first run of each evaluates the whole prompt
        await timed_job(bus, messages, max_tokens)
        for _ in range(runs):
            ttft, tps, n = _raw_once(llm, messages, max_tokens)
            raw["ttft"].append(ttft)
            raw["tps"].append(tps)
            raw["gen_tps"].append(n / (ttft + (n - 1) / tps) if tps else 0.0)
            raw["tokens"].append(n)
            t = await timed_job(bus, messages, max_tokens)
            svc["ttft"].append(t.ttft_s)
            svc["tps"].append((t.tokens - 1) / (t.total_s - t.ttft_s) if t.tokens > 1 else 0.0)
            svc["gen_tps"].append(t.tokens / t.total_s)
            svc["tokens"].append(t.tokens)
    finally:
        await bus.close()
        stack.stop_all("inference")
        del llm

    def summary(d: dict[str, list[float]]) -> dict[str, Any]:
        return {"ttft_ms": _ms(statistics.median(d["ttft"])), "decode_tokens_per_s": round(statistics.median(d["tps"]), 1),
                "tokens_per_generation_s": round(statistics.median(d["gen_tps"]), 1),
                "tokens": statistics.median(d["tokens"])}

    return {"what": "the prompt dialogue sent (a job taken off kefu.llm.generate during the phase), stack idle, "
                    "raw and service runs alternating; medians", "threads": threads, "runs": runs,
            "max_tokens": max_tokens, "raw": summary(raw), "service_idle": summary(svc)}


class JobTap:
    """Takes the first generation job dialogue queues (the real prompt) off ``kefu.llm.generate``."""

    def __init__(self) -> None:
        self.job: Any = None
        self.seen = 0
        self.nc: Any = None

    async def attach(self, nats_url: str) -> None:
        import nats

        from kefu.proto.bus.v1 import llm_pb2
        from kefu.shared.streams import LLM_GENERATE

        self.nc = await nats.connect(nats_url)

        async def got(msg: Any) -> None:
            self.seen += 1
            if self.job is None:
                job = llm_pb2.GenerateRequest()
                job.ParseFromString(msg.data)  # the bench runs with encryption at rest off
                self.job = job

        await self.nc.subscribe(LLM_GENERATE, cb=got)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


def _llm_figures(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, Any]:
    """Inference's own figures over a phase, from its Prometheus counters (all replicas)."""
    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    gens, gen_s, tokens = d("kefu_llm_generation_seconds_count"), d("kefu_llm_generation_seconds_sum"), \
        d("kefu_llm_tokens_total")
    ttft_n, ttft_s = d("kefu_llm_time_to_first_token_seconds_count"), d("kefu_llm_time_to_first_token_seconds_sum")
    return {"jobs": int(gens), "tokens": int(tokens),
            "tokens_per_generation_s": round(tokens / gen_s, 1) if gen_s else None,
            "tokens_per_s_all_replicas": round(tokens / wall_s, 1),
            "ttft_mean_ms": _ms(ttft_s / ttft_n) if ttft_n else None,
            "mean_tokens_per_job": round(tokens / gens, 1) if gens else None}


async def run_phase(stack: Stack, path: str, replicas: int, cores: int, sessions: int, seconds: float,
                    think_s: float, texts: list[str]) -> dict[str, Any]:
    """One measured phase on the replicas already started by ``stack.phase``."""
    # Warm: the first turns load caches (embedder, prefix) that a running deployment has warm.
    await run_load(stack.bases, TENANT, texts, sessions=2 * replicas, seconds=1.0, think_s=0, ramp_s=0, seed=99)
    before = await stack.scrape("inference")
    with Usage(stack.pids()) as usage:
        run = await run_load(stack.bases, TENANT, texts, sessions=sessions, seconds=seconds, think_s=think_s,
                             ramp_s=min(5.0, seconds / 4), seed=replicas)
    after = await stack.scrape("inference")
    out = {"path": path, "replicas": {"gateway": replicas, "dialogue": replicas,
                                      "inference": replicas if path == "gen" else 0},
           "llm_threads_per_replica": max(1, cores // replicas) if path == "gen" else None,
           "think_s": think_s, **summarize(run), "stored": await check_stored(ADMIN, run),
           "processes": usage.result, "load_average": usage.load_average}
    if path == "gen":
        out["inference"] = _llm_figures(before, after, run.seconds)
    return out


def _brief(p: dict[str, Any]) -> str:
    return json.dumps({"turns_per_s": p["turns_per_s"], "p50_ms": p["latency"]["p50_ms"],
                       "p99_ms": p["latency"]["p99_ms"], "ttft_p50_ms": p["ttft"]["p50_ms"],
                       "held": p["sessions"]["ws_held_and_answered"], "errors": p["turns"]["errors_by_code"],
                       "load": p["load_average"]})


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from kefu.shared.models import DEFAULT_LLM, resolve

    cores = os.cpu_count() or 2
    docs = kb_documents()
    texts = questions()
    phases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with Stack(Path(tmp)) as stack:
            for i, replicas in enumerate(args.replicas):
                await stack.phase("faq", replicas, cores)
                if i == 0:
                    await import_kb(stack.base, TENANT, docs)
                key = f"faq-{replicas}"
                phases[key] = await run_phase(stack, "faq", replicas, cores, args.sessions, args.seconds, args.think,
                                              texts)
                print(key, _brief(phases[key]), flush=True)
            # The baselines right after, on the same retrieval and gateway processes, nothing else running.
            stack.stop_all("dialogue")
            peak = max(p["turns"]["peak_in_flight"] for k, p in phases.items() if k.startswith("faq"))
            healthz = await healthz_baseline(stack.base, 200, peak, min(10.0, args.seconds))
            search = await search_baseline(stack.nats.url, TENANT, texts, 200, peak, min(10.0, args.seconds))
            tap = JobTap()
            await tap.attach(stack.nats.url)
            try:
                for replicas in args.replicas:
                    await stack.phase("gen", replicas, args.llm_threads)
                    key = f"gen-{replicas}"
                    phases[key] = await run_phase(stack, "gen", replicas, args.llm_threads, args.gen_sessions,
                                                  args.gen_seconds, args.gen_think, texts)
                    print(key, _brief(phases[key]), json.dumps(phases[key]["inference"]), flush=True)
            finally:
                await tap.close()
            for name in ("gateway", "dialogue", "inference"):
                stack.stop_all(name)
            model = resolve(DEFAULT_LLM, stack.data)
            assert tap.job is not None, "no generation job was seen"
            messages = [{"role": m.role, "content": m.content} for m in tap.job.messages]
            engine = await engine_baseline(stack, model, messages, min(tap.job.max_tokens, args.raw_max_tokens),
                                           args.llm_threads, args.raw_runs)
    return {"phases": phases, "healthz": healthz, "search": search, "engine": engine, "model": model.name,
            "prompt_chars": sum(len(m["content"]) for m in messages)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a try: few sessions, a few seconds, 1 replica")
    ap.add_argument("--sessions", type=int, default=200, help="FAQ-path visitor sessions")
    ap.add_argument("--seconds", type=float, default=30.0, help="FAQ-path phase length")
    ap.add_argument("--think", type=float, default=3.0, help="mean think time between a visitor's turns (s)")
    ap.add_argument("--gen-sessions", type=int, default=8, help="generation-path sessions")
    ap.add_argument("--gen-seconds", type=float, default=40.0)
    ap.add_argument("--gen-think", type=float, default=3.0)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replicas of gateway and dialogue "
                    "(and inference on the generation path), one phase each")
    ap.add_argument("--llm-threads", type=int, default=os.cpu_count() or 2,
                    help="llama.cpp threads, split between the inference replicas (and the raw engine's); on a "
                         "machine whose cores other work also uses, 1 (llama.cpp's threads wait for each other)")
    ap.add_argument("--raw-runs", type=int, default=5, help="runs of each, raw and idle service, on dialogue's prompt")
    ap.add_argument("--raw-max-tokens", type=int, default=32, help="tokens each of those runs generates at most")
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.seconds, args.gen_sessions, args.gen_seconds = 20, 5.0, 3, 8.0
        args.replicas, args.raw_runs = [1], min(args.raw_runs, 3)
    from bench.gateway import _raise_nofile
    from bench.run import write

    _raise_nofile()
    load0 = os.getloadavg()
    r = asyncio.run(bench(args))
    write("load", report(args, r, load0))


def report(args: argparse.Namespace, r: dict[str, Any], load0: tuple[float, float, float]) -> dict[str, Any]:
    """bench()'s measurements as the figures, their baselines and the ratios."""
    phases, healthz, search, engine = r["phases"], r["healthz"], r["search"], r["engine"]
    one = args.replicas[0]
    faq, gen = phases[f"faq-{one}"], phases[f"gen-{one}"]
    raw, idle = engine["raw"], engine["service_idle"]
    figure = {
        "what": f"visitor sessions over WebSockets (75 %) and HTTP/SSE, FAQ path (cited KB answer, generation off) "
                f"and generation path ({r['model']}); {one} replica of each service unless named",
        "sessions_held": max(p["sessions"]["ws_held_and_answered"] for p in phases.values()),
        "faq_turns_per_s": faq["turns_per_s"], "faq_p50_ms": faq["latency"]["p50_ms"],
        "faq_p95_ms": faq["latency"]["p95_ms"], "faq_p99_ms": faq["latency"]["p99_ms"],
        **{f"faq_{k}_turns_per_s": p["turns_per_s"] for k, p in ((k.split("-")[1] + "_replicas", p)
                                                                for k, p in phases.items() if k.startswith("faq"))},
        "gen_turns_per_s": gen["turns_per_s"], "gen_p50_ms": gen["latency"]["p50_ms"],
        "gen_p99_ms": gen["latency"]["p99_ms"], "gen_visitor_first_delta_p50_ms": gen["ttft"]["p50_ms"],
        "gen_ttft_ms": gen["inference"]["ttft_mean_ms"],
        "gen_tokens_per_generation_s": gen["inference"]["tokens_per_generation_s"],
        "gen_idle_service_ttft_ms": idle["ttft_ms"], "gen_idle_service_decode_tokens_per_s": idle["decode_tokens_per_s"],
        "errors": sum(p["turns"]["errors"] for p in phases.values()),
        "lost_turns": sum(p["stored"]["lost"] for p in phases.values()),
        "duplicated_turns": sum(p["stored"]["duplicated"] for p in phases.values()),
    }
    baseline = {
        "what": "FAQ: bare retrieval search over NATS and GET /healthz on the gateway, stack idle; generation: raw "
                "llama-cpp-python on dialogue's prompt, same threads, stack idle",
        "search_p50_ms": search["sequential"]["p50_ms"], "search_p99_ms": search["sequential"]["p99_ms"],
        "searches_per_s": search["concurrent"]["searches_per_s"],
        "healthz_p50_ms": healthz["sequential"]["p50_ms"], "healthz_p99_ms": healthz["sequential"]["p99_ms"],
        "healthz_per_s": healthz["concurrent"]["requests_per_s"],
        "raw_ttft_ms": raw["ttft_ms"], "raw_decode_tokens_per_s": raw["decode_tokens_per_s"],
        "raw_tokens_per_generation_s": raw["tokens_per_generation_s"],
    }
    return {
        "figure": figure, "baseline": baseline,
        "ratios": {
            "faq_turns_per_s_over_searches_per_s": _ratio(figure["faq_turns_per_s"], baseline["searches_per_s"]),
            "faq_p50_over_search_p50": _ratio(figure["faq_p50_ms"], baseline["search_p50_ms"]),
            "faq_p99_over_search_p99": _ratio(figure["faq_p99_ms"], baseline["search_p99_ms"]),
            "gen_ttft_under_load_over_raw": _ratio(figure["gen_ttft_ms"], baseline["raw_ttft_ms"]),
            "gen_tokens_per_generation_s_under_load_over_raw": _ratio(figure["gen_tokens_per_generation_s"],
                                                                      baseline["raw_tokens_per_generation_s"]),
            "idle_service_ttft_over_raw": _ratio(idle["ttft_ms"], raw["ttft_ms"]),
            "idle_service_decode_over_raw": _ratio(idle["decode_tokens_per_s"], raw["decode_tokens_per_s"]),
        },
        "cores": os.cpu_count(), "llm_threads": args.llm_threads, "quick": args.quick,
        "load_average": {"before": round(load0[0], 2), "after": round(os.getloadavg()[0], 2),
                         "phases_median": {k: p["load_average"]["median"] for k, p in phases.items()}},
        "note": "the load generator, nats-server and every service share the machine's cores: a second replica adds "
                "parallelism, not cores (inference: --llm-threads on one replica, split between two, at least 1 each); the "
                "load average counts whatever else the machine runs",
        "settings": {"sessions": args.sessions, "seconds": args.seconds, "think_s": args.think,
                     "gen_sessions": args.gen_sessions, "gen_seconds": args.gen_seconds, "gen_think_s": args.gen_think,
                     "ws_share": 0.75, "kb_documents": len(kb_documents()), "questions": len(questions()),
                     "prompt_chars": r["prompt_chars"], "replicas": args.replicas},
        "phases": phases, "healthz_baseline": healthz, "search_baseline": search, "engine_baseline": engine,
    }


if __name__ == "__main__":
    main()
