"""Metrics benchmark (part of `make bench`; alone: `python -m bench.metrics`): what the Prometheus
instrumentation adds to a turn, and what a scrape costs.

- Per turn: everything a turn records across the services (dialogue's turn histogram, the gateway's
  request counter, inference's three figures, the plugins' hook counter, retrieval's freshness), timed
  over many turns, against the same loop with nothing recorded (the baseline), in the same run.
- Scrape: GET /metrics over HTTP from a real MetricsServer holding every kefu metric with realistic
  label sets, against GET /healthz on the same server (the HTTP cost alone).

Writes bench/results/metrics.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import urllib.request

from bench.run import write


def per_turn(turns: int) -> tuple[float, float]:
    """(seconds a turn's records take, seconds the empty loop takes), per turn."""
    from kefu.shared import metrics

    def record(i: int) -> None:
        metrics.turn_duration().labels("kb").observe(0.012)
        metrics.http_requests().labels("/v1/conversations/{cid}/messages", "200").inc()
        metrics.plugin_calls().labels("ai_enhancer", "hook:on_message", "ok").inc()
        metrics.llm_time_to_first_token().observe(0.05)
        metrics.llm_tokens().inc(40)
        metrics.llm_generation().observe(0.4)
        metrics.kb_freshness_lag().observe(0.03)

    def nothing(i: int) -> None:
        pass

    out = []
    for fn in (record, nothing):
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(turns):
                fn(i)
            runs.append((time.perf_counter() - t0) / turns)
        out.append(statistics.median(runs))
    return out[0], out[1]


async def scrape(n: int) -> tuple[float, float, int]:
    """(median GET /metrics, median GET /healthz, bytes of /metrics) from a MetricsServer."""
    from kefu.shared import metrics
    from kefu.shared.metrics import MetricsServer

    for name in ("gateway", "dialogue", "retrieval", "inference", "plugins"):
        metrics.declare(name)
    for source in ("kb", "llm", "agent", "plugin", "handoff"):
        metrics.turn_duration().labels(source).observe(0.1)
    for code in ("invalid_token", "rate_limited", "not_found", "invalid_field", "unavailable"):
        metrics.count_error("gateway", code)
    server = MetricsServer("127.0.0.1", 0, healthy=lambda: True, ready=lambda: True)
    port = await server.start()

    def get(path: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            size = len(r.read())
        return time.perf_counter() - t0, size

    try:
        m = [await asyncio.to_thread(get, "/metrics") for _ in range(n)]
        h = [await asyncio.to_thread(get, "/healthz") for _ in range(n)]
    finally:
        await server.close()
    return statistics.median(t for t, _ in m), statistics.median(t for t, _ in h), m[-1][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=20000)
    ap.add_argument("--scrapes", type=int, default=200)
    args = ap.parse_args()
    turn, empty = per_turn(args.turns)
    got, health, size = asyncio.run(scrape(args.scrapes))
    write("metrics", {
        "figure_us_per_turn": round((turn - empty) * 1e6, 2), "baseline_us_per_turn_empty_loop": round(empty * 1e6, 3),
        "dialogue_turn_target_ms": 5.0,
        "figure_scrape_ms": round(got * 1000, 3), "baseline_healthz_ms": round(health * 1000, 3),
        "scrape_bytes": size,
        "note": "per turn: every record a turn makes across the five services, in one process",
    })


if __name__ == "__main__":
    main()
