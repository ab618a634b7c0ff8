"""The chaos suite's harness (tests/chaos/conftest.py makes the fixtures of it): the stack: a real nats-server and every service as its own process (so ``kill -9`` is
real), two gateway replicas behind a client that fails over between them as a load balancer would, two
retrieval replicas with their own data dirs; and the visitors that load it, retrying with the same
``client_msg_id`` as the web widget does.

``KEFU_CHAOS_SCALE=full`` (``make test-chaos``) runs every scenario at full size; the default is the short
version that ``make test`` runs. Figures go to bench/results/chaos.json (one section per scenario).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kefu.proto.bus.v1 import common_pb2
from kefu.shared.bus import Bus
from kefu.shared.natsserver import NatsServer, die_with_parent, free_port
from kefu.shared.service import health_subject

FULL = os.environ.get("KEFU_CHAOS_SCALE", "short").strip().lower() == "full"
ADMIN = "chaos-admin-token-0123456789"
TENANT = "chaos"
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "chaos.json"
LAMP = {"title": "Desk lamp L2", "text": "The L2 desk lamp costs 129 yuan. It has three colour temperatures."}
QUESTION = "How much is the L2 desk lamp?"
# Statuses a client retries on: the service it reached is restarting (503), a turn outlived its deadline
# (504), two writers met (409). Anything else (a 500, a 4xx) fails the scenario.
RETRY_STATUSES = (409, 503, 504)
# Seconds a scenario may take, the stack's start-up included (7 processes loading models on 2 shared cores).
TIMEOUT = 3600 if FULL else 900


def scaled(short: float, full: float) -> Any:
    """The short figure for make test, the full one for make test-chaos."""
    return full if FULL else short


@dataclass
class Proc:
    """One service replica, a child process of the test (kill -9 is a real one)."""

    name: str
    service: str
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    kills: int = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen([sys.executable, "-m", f"kefu.{self.service}"], env=self.env,
                                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          preexec_fn=die_with_parent)

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()
            self.kills += 1

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of the process now (MB)."""
        assert self.popen is not None
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


class ChaosStack:
    """nats-server (a fixed port and store, so it can be restarted in place) and the service replicas."""

    def __init__(self, root: Path, models: Path) -> None:
        self.root = root
        self.nats = NatsServer(root / "jetstream", port=free_port(), log_file=root / "nats.log")
        self.bus: Bus | None = None
        lifted = {f"KEFU_RATE_{k}_{x}": "1000000" for k in ("MESSAGES", "IP_MESSAGES", "TENANT_MESSAGES", "STARTS",
                                                            "TENANT_STARTS") for x in ("PER_SECOND", "BURST")}
        base = dict(os.environ, KEFU_NATS_URL=self.nats.url, KEFU_ADMIN_TOKEN=ADMIN, KEFU_SECRET_KEY="chaos-" * 6,
                    KEFU_LOG_LEVEL="warning", KEFU_LOG_FORMAT="json", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    KEFU_LLM_ENABLED="false", KEFU_OCR_ENABLED="false", KEFU_SNAPSHOT_INTERVAL="1",
                    KEFU_METRICS_PORT="off", **lifted)
        base.pop("KEFU_MASTER_KEY", None)  # the session stack's, set in this process by the root conftest
        self.procs: dict[str, Proc] = {}
        self.http: dict[str, str] = {}

        def data_dir(name: str) -> Path:
            d = root / name
            d.mkdir()
            (d / "models").symlink_to(models / "models")
            return d

        shared = data_dir("data")
        for name, service in (("dialogue", "dialogue"), ("inference", "inference"), ("plugins", "plugins"),
                              ("retrieval-a", "retrieval"), ("retrieval-b", "retrieval"),
                              ("gateway-a", "gateway"), ("gateway-b", "gateway")):
            env = dict(base, KEFU_INSTANCE=name, KEFU_DATA_DIR=str(shared))
            if service == "retrieval":  # each replica its own disk, as in Kubernetes (its index snapshot)
                # info: its start-up phases (embedder, snapshot, catch-up) with their seconds, in its log.
                env.update(KEFU_DATA_DIR=str(data_dir(name)), KEFU_LOG_LEVEL="info")
            if service == "gateway":
                port = free_port()
                env.update(KEFU_HTTP_PORT=str(port), KEFU_GRPC_PORT=str(free_port()), KEFU_TURN_TIMEOUT="60")
                self.http[name] = f"http://127.0.0.1:{port}"
            self.procs[name] = Proc(name, service, env, root / f"{name}.log")

    async def up(self) -> None:
        self.nats.start()
        self.bus = await Bus.connect([self.nats.url], "chaos-monitor", default_timeout=5)
        for p in self.procs.values():
            p.start()
        await self.healthy(list(self.procs), timeout=300)

    async def close(self) -> None:
        for p in self.procs.values():
            p.stop()
        if self.bus is not None:
            await self.bus.close()
        self.nats.stop()

    @property
    def gateways(self) -> list[str]:
        return list(self.http.values())

    async def health(self, service: str, wait: float = 0.4) -> dict[str, dict[str, str]]:
        """The replicas of ``service`` answering their health check now: instance -> details."""
        assert self.bus is not None
        found: dict[str, dict[str, str]] = {}
        if not self.bus.nc.is_connected:
            return found
        with contextlib.suppress(Exception):
            async with self.bus.inbox() as (inbox, sub):
                await self.bus.nc.publish(health_subject(service), common_pb2.HealthRequest().SerializeToString(),
                                          reply=inbox)
                deadline = time.monotonic() + wait
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        msg = await sub.next_msg(timeout=left)
                    except TimeoutError:
                        break
                    with contextlib.suppress(Exception):
                        reply = common_pb2.HealthReply.FromString(msg.data)
                        found[reply.instance] = dict(reply.details)
        return found

    async def instances(self, service: str) -> set[str]:
        return set(await self.health(service))

    async def healthy(self, names: list[str], timeout: float = 120) -> float:
        """Wait until every replica in ``names`` answers its health check; the seconds it took."""
        t0 = time.monotonic()
        left = set(names)
        while left:
            for service in {self.procs[n].service for n in left}:
                left -= await self.instances(service)
            for n in left:
                assert self.procs[n].alive, f"{n} exited:\n{self.procs[n].tail()}"
            assert time.monotonic() - t0 < timeout, f"not healthy after {timeout}s: {sorted(left)}\n" + "\n".join(
                self.procs[n].tail() for n in sorted(left))
            if left:
                await asyncio.sleep(0.2)
        return time.monotonic() - t0

    async def revive(self) -> None:
        """Start whatever is not running (a scenario that failed half-way leaves the next one a whole stack)."""
        for p in self.procs.values():
            if not p.alive:
                p.start()
        await self.healthy(list(self.procs), timeout=300)

    def stop_nats(self) -> None:
        self.nats.stop()

    def start_nats(self) -> None:
        # The same port and store directory: the broker comes back where every client looks for it.
        self.nats.start()

    async def consumers_busy(self) -> dict[str, tuple[int, int]]:
        """Consumers of every stream that still have messages pending or unacknowledged."""
        assert self.bus is not None
        busy: dict[str, tuple[int, int]] = {}
        for stream in await self.bus.js.streams_info():
            for c in await self.bus.js.consumers_info(stream.config.name):
                if c.num_pending or c.num_ack_pending:
                    busy[f"{stream.config.name}/{c.name}"] = (c.num_pending, c.num_ack_pending)
        return busy


def client(timeout_s: float) -> aiohttp.ClientSession:
    """The visitors' HTTP client: no cap on connections (aiohttp's default of 100 would queue the 101st
    conversation, and hold an open WebSocket's place, so 500 would never be at the gateways at once)."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                 connector=aiohttp.TCPConnector(limit=0))


async def admin_call(s: aiohttp.ClientSession, gateways: list[str], method: str, path: str,
                     body: object = None) -> dict:
    """An admin request sent again, to the next gateway in turn, until one answers 200 (a replica may be
    restarting); any answer but a retryable one fails the test."""
    for attempt in range(100):
        base = gateways[attempt % len(gateways)]
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with s.request(method, base + path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                if r.status == 200:
                    return await r.json()
                assert r.status in RETRY_STATUSES, (method, path, r.status, await r.text())
        await asyncio.sleep(0.2)
    raise AssertionError(f"{method} {path}: no 200 in 100 tries")


async def put_document(s: aiohttp.ClientSession, gateways: list[str], doc_id: str, doc: dict[str, str]) -> dict:
    """PUT a document through the first gateway that confirms it (200)."""
    return await admin_call(s, gateways, "PUT", f"/v1/tenants/{TENANT}/documents/{doc_id}", doc)


@dataclass
class Tally:
    """What the clients saw, across every visitor of a scenario."""

    acked: int = 0
    attempts: int = 0
    retries: int = 0
    failovers: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    # The monotonic times of every acknowledgement: the longest gap is how long visitors waited.
    ack_times: list[float] = field(default_factory=list)

    def saw(self, what: str) -> None:
        self.statuses[what] = self.statuses.get(what, 0) + 1

    def longest_gap(self, since: float, until: float) -> float:
        times = [since, *sorted(t for t in self.ack_times if since <= t <= until), until]
        return max(b - a for a, b in zip(times, times[1:], strict=False))


class Visitor:
    """One conversation driven over HTTP the way the widget does: a message is acknowledged when the
    gateway answers 200; until then it is sent again with the same client_msg_id, to the other gateway
    when the one it used is gone (what a load balancer in front of the replicas does)."""

    def __init__(self, n: int, s: aiohttp.ClientSession, gateways: list[str], tally: Tally) -> None:
        self.n = n
        self.s = s
        self.gateways = gateways
        self.prefer = n % len(gateways)
        self.tally = tally
        self.cid = ""
        self.token = ""
        # (text, seq) of every acknowledged message, in order.
        self.sent: list[tuple[str, int]] = []

    async def _until_ok(self, method: str, path: str, body: dict, headers: dict, deadline_s: float = 180) -> dict:
        deadline = time.monotonic() + deadline_s
        while True:
            base = self.gateways[self.prefer]
            self.tally.attempts += 1
            try:
                async with self.s.request(method, base + path, json=body, headers=headers) as r:
                    if r.status in (200, 201):
                        return await r.json()
                    text = await r.text()
                    assert r.status in RETRY_STATUSES, (r.status, text)
                    code = json.loads(text)["error"]["code"]  # typed, always
                    self.tally.saw(f"{r.status} {code}")
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.tally.saw(type(exc).__name__)
                # The gateway is gone (or not answering): the other replica, as a balancer would.
                self.prefer = (self.prefer + 1) % len(self.gateways)
                self.tally.failovers += 1
            assert time.monotonic() < deadline, f"visitor {self.n}: no answer in {deadline_s}s"
            self.tally.retries += 1
            await asyncio.sleep(0.1 + random.random() * 0.3)

    async def start(self) -> None:
        self.cid, self.token = await self.start_ids()

    async def start_ids(self) -> tuple[str, str]:
        conv = await self._until_ok("POST", f"/v1/tenants/{TENANT}/conversations", {}, {})
        return conv["conversation_id"], conv["visitor_token"]

    async def say(self, text: str, cmid: str) -> dict:
        reply = await self._until_ok("POST", f"/v1/conversations/{self.cid}/messages",
                                     {"text": text, "client_msg_id": cmid},
                                     {"Authorization": f"Bearer {self.token}"})
        self.sent.append((text, reply["seq"]))
        self.tally.acked += 1
        self.tally.ack_times.append(time.monotonic())
        return reply

    async def chat(self, until: asyncio.Event, think_s: float = 0.3) -> None:
        """Ask until ``until`` is set (at least once)."""
        m = 0
        while True:
            await self.say(f"{QUESTION} ({self.n}/{m})", f"v{self.n}-m{m}")
            m += 1
            if until.is_set():
                return
            await asyncio.sleep(think_s * (0.5 + random.random()))


async def conversation(s: aiohttp.ClientSession, base: str, cid: str) -> dict:
    """The state as an admin sees it (with each bot turn's provenance)."""
    return await admin_call(s, [base], "GET", f"/v1/conversations/{cid}")


@dataclass
class Audit:
    """What the stored conversations say about what the clients were told."""

    conversations: int = 0
    messages: int = 0
    lost: int = 0  # acknowledged (200) but not in the conversation
    duplicated: int = 0  # a visitor message stored twice, or answered twice
    unanswered: int = 0
    out_of_order: int = 0  # conversations whose seqs do not strictly increase
    problems: list[str] = field(default_factory=list)
    bot_turns: list[dict] = field(default_factory=list)

    def check(self, state: dict, sent: list[tuple[str, int]]) -> None:
        """The visitor's turns must be exactly what the client was told was stored, in order, each
        followed by one reply."""
        cid, turns = state["conversation_id"], state["turns"]
        self.conversations += 1
        self.messages += len(sent)
        seqs = [t["seq"] for t in turns]
        if seqs != sorted(set(seqs)):
            self.out_of_order += 1
            self.problems.append(f"{cid}: seqs {seqs}")
        visitor = [(t["text"], t["seq"]) for t in turns if t["role"] == "visitor"]
        sent = sorted(sent, key=lambda m: m[1])
        texts = [text for text, _ in visitor]
        self.lost += sum(1 for m in sent if m not in visitor)
        self.duplicated += len(texts) - len(set(texts))
        roles = [t["role"] for t in turns]
        bots = [t for t in turns if t["role"] == "bot"]
        self.duplicated += max(0, len(bots) - len(visitor))
        self.unanswered += max(0, len(visitor) - len(bots))
        if visitor != sent or roles != ["visitor", "bot"] * len(visitor):
            self.problems.append(f"{cid}: stored {roles} {visitor}, acknowledged {sent}")
        self.bot_turns += bots

    def figures(self) -> dict[str, int]:
        return {"conversations": self.conversations, "messages_acknowledged": self.messages, "lost": self.lost,
                "duplicated": self.duplicated, "unanswered": self.unanswered, "seq_out_of_order": self.out_of_order}

    def assert_clean(self) -> None:
        assert not self.problems, f"{len(self.problems)} conversations wrong, e.g.\n" + "\n".join(self.problems[:5])


def record(section: str, figures: dict[str, Any]) -> None:
    """Write one scenario's figures into bench/results/chaos.json (the bench report's shape: see bench/run.py);
    a short run does not replace the figures of a full one."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        report = {}
    if not FULL and report.get(section, {}).get("scale") == "full":
        return  # a make test run keeps make test-chaos's figures (the report's)
    report.update({"benchmark": "chaos", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                   "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    report[section] = {"scale": "full" if FULL else "short", **figures}
    RESULTS.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


class WsVisitor:
    """One conversation over the visitor WebSocket, as the widget drives it: one message at a time, sent
    again (same client_msg_id) after an ``error`` frame or a silent minute; a dropped socket is opened
    again with ``last_seq``, the highest reply seq seen. A message is acknowledged by its ``reply`` frame."""

    def __init__(self, n: int, s: aiohttp.ClientSession, base: str, tally: Tally) -> None:
        self.n = n
        self.s = s
        self.ws_url = base.replace("http://", "ws://") + "/v1/ws"
        self.base = base
        self.tally = tally
        self.cid = ""
        self.token = ""
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.sent: list[tuple[str, int]] = []
        self.last_seq = 0  # the highest reply_seq seen
        self.errors: list[str] = []

    async def start(self) -> None:
        self.cid, self.token = await Visitor(self.n, self.s, [self.base], self.tally).start_ids()

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        while True:
            try:
                self.ws = await self.s.ws_connect(f"{self.ws_url}?token={self.token}&last_seq={self.last_seq}",
                                                  heartbeat=None, autoping=True)
                return self.ws
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.tally.saw(f"ws connect {type(exc).__name__}")
                await asyncio.sleep(0.3)

    async def say(self, text: str, cmid: str, silence_s: float = 60) -> None:
        acked = {seq for _, seq in self.sent}
        while True:
            ws = self.ws if self.ws is not None and not self.ws.closed else await self.connect()
            self.tally.attempts += 1
            try:
                await ws.send_json({"type": "message", "text": text, "client_msg_id": cmid})
                while True:
                    msg = await ws.receive(timeout=silence_s)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise ConnectionError(f"socket {msg.type.name}")
                    frame = json.loads(msg.data)
                    if frame["type"] == "reply":
                        self.last_seq = max(self.last_seq, frame["reply_seq"])
                        if frame["seq"] not in acked:
                            self.sent.append((text, frame["seq"]))
                            self.tally.acked += 1
                            self.tally.ack_times.append(time.monotonic())
                            return
                    elif frame["type"] == "error":
                        self.tally.saw(f"ws error {frame['code']}")
                        self.errors.append(frame["code"])
                        break
                    elif frame["type"] == "agent_message":
                        self.last_seq = max(self.last_seq, frame["seq"])
            except (ConnectionError, aiohttp.ClientError, TimeoutError) as exc:
                self.tally.saw(f"ws {type(exc).__name__}")
                with contextlib.suppress(Exception):
                    await ws.close()
                self.ws = None
            self.tally.retries += 1
            await asyncio.sleep(0.2 + random.random() * 0.3)

    async def chat(self, until: asyncio.Event, think_s: float = 0.3) -> None:
        m = 0
        while True:
            await self.say(f"{QUESTION} (ws {self.n}/{m})", f"w{self.n}-m{m}")
            m += 1
            if until.is_set():
                return
            await asyncio.sleep(think_s * (0.5 + random.random()))

    async def replayed_after(self, last_seq: int, expect: int, settle_s: float = 0.5) -> list[int]:
        """Open a new socket with ``last_seq``: the reply seqs it is sent first (waits for ``expect`` of
        them, then ``settle_s`` more for any extra)."""
        seqs: list[int] = []
        async with self.s.ws_connect(f"{self.ws_url}?token={self.token}&last_seq={last_seq}") as ws:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                wait = settle_s if len(seqs) >= expect else deadline - time.monotonic()
                try:
                    msg = await ws.receive(timeout=wait)
                except TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = json.loads(msg.data)
                if frame["type"] == "reply":
                    seqs.append(frame["reply_seq"])
                elif frame["type"] == "resync":
                    seqs.append(-1)  # a resync instead of the replay: wrong here (a few missed, all known)
        return seqs
