"""python -m bench.soak (``make soak``; by hand, not in CI): a steady load for a long time (default 30
minutes) and the memory of every service over it.

The stack of bench.load (each service its own process, the 64-document KB), one replica of each; visitors
from bench.load's generator, each asking ``--turns`` questions (think time ``--think``) before leaving
and a new visitor taking its place, so conversations come and go as on a real site. The RSS of every
process is sampled every ``--every`` seconds; after the warm-up (caches filling, the allocator's arenas
growing to their working size) a least-squares line through each service's samples gives its slope in
MB per hour. A service is flat when that slope is at most ``--flat-mb-per-hour`` (default 10 MB/h: a
service growing faster would gain a quarter of a GB a day). Every conversation is read back at the end,
as in bench.load (nothing acknowledged lost or duplicated).

``--gen`` soaks the generation path (inference running the bundled model) instead of the FAQ path.
Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.load import (
    ADMIN,
    TENANT,
    LoadRun,
    Stack,
    Usage,
    check_stored,
    import_kb,
    kb_documents,
    latency_ms,
    questions,
    run_load,
    summarize,
)


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of (seconds, MB) points, in MB per hour; None with fewer than 3 points."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx * 3600


def memory_verdict(series: list[tuple[float, dict[str, float]]], warmup_s: float,
                   flat_mb_per_hour: float) -> dict[str, Any]:
    """Each service's RSS after ``warmup_s``: first, last, peak, the fitted slope and whether it is flat."""
    out: dict[str, Any] = {}
    names = sorted({name for _, row in series for name in row})
    for name in names:
        points = [(t, row[name]) for t, row in series if t >= warmup_s and name in row]
        slope = slope_per_hour(points)
        out[name] = {"samples": len(points),
                     "rss_mb_after_warmup": points[0][1] if points else None,
                     "rss_mb_at_end": points[-1][1] if points else None,
                     "rss_mb_peak": max(p[1] for p in points) if points else None,
                     "slope_mb_per_hour": round(slope, 2) if slope is not None else None,
                     "flat": slope is not None and slope <= flat_mb_per_hour}
    return out


def by_minute(run: LoadRun) -> list[dict[str, Any]]:
    """Turns answered, errors and latency per minute of the run: the load was steady, or it was not."""
    buckets: dict[int, list[Any]] = {}
    for t in run.turns:
        buckets.setdefault(int((t.sent_at - run.started_at) // 60), []).append(t)
    rows = []
    for minute in sorted(buckets):
        turns = buckets[minute]
        ok = [t for t in turns if t.code == "ok"]
        rows.append({"minute": minute, "turns_ok": len(ok), "turns_per_s": round(len(ok) / 60, 2),
                     "errors_by_code": dict(Counter(t.code for t in turns if t.code != "ok")),
                     "p50_ms": latency_ms([t.latency_s for t in ok])["p50_ms"],
                     "p99_ms": latency_ms([t.latency_s for t in ok])["p99_ms"]})
    return rows


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    cores = os.cpu_count() or 2
    path = "gen" if args.gen else "faq"
    with tempfile.TemporaryDirectory() as tmp:
        async with Stack(Path(tmp)) as stack:
            await stack.phase(path, 1, cores)
            await import_kb(stack.base, TENANT, kb_documents())
            print(f"soak: {path} path, {args.sessions} sessions, {args.minutes} min", flush=True)
            with Usage(stack.pids(), every_s=args.every) as usage:
                run = await run_load(stack.bases, TENANT, questions(), sessions=args.sessions,
                                     seconds=args.minutes * 60, think_s=args.think, ramp_s=min(10.0, args.minutes * 6),
                                     turns_per_session=args.turns, timeout_s=60.0)
            stored = await check_stored(ADMIN, run)
    warmup_s = args.warmup_minutes * 60
    memory = memory_verdict(usage.series, warmup_s, args.flat_mb_per_hour)
    per_hour = len(run.sessions) / (args.minutes / 60)  # conversations started per hour
    for m in memory.values():  # growth that follows the conversations: a cache per conversation, or a leak
        m["mb_per_1000_conversations"] = round(m["slope_mb_per_hour"] / per_hour * 1000, 2) \
            if m["slope_mb_per_hour"] is not None and per_hour else None
    return {"path": path, "minutes": args.minutes, "warmup_minutes": args.warmup_minutes,
            "sample_every_s": args.every, "flat_mb_per_hour": args.flat_mb_per_hour,
            "verdict": "flat" if all(m["flat"] for m in memory.values()) else "growing",
            "growing": [name for name, m in memory.items() if not m["flat"]],
            "memory": memory, "load": {**summarize(run), "stored": stored}, "per_minute": by_minute(run),
            "processes": usage.result, "load_average": usage.load_average,
            "settings": {"sessions": args.sessions, "turns_per_session": args.turns, "think_s": args.think},
            "series": usage.series}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup-minutes", type=float, default=None, help="default: a fifth of the run, at most 5")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--sessions", type=int, default=40, help="visitors at once")
    ap.add_argument("--turns", type=int, default=6, help="questions a visitor asks before leaving")
    ap.add_argument("--think", type=float, default=2.0, help="mean think time between a visitor's turns (s)")
    ap.add_argument("--gen", action="store_true", help="the generation path (the bundled model) instead of FAQ")
    ap.add_argument("--flat-mb-per-hour", type=float, default=10.0)
    args = ap.parse_args()
    if args.warmup_minutes is None:
        args.warmup_minutes = min(5.0, args.minutes / 5)
    from bench.gateway import _raise_nofile
    from bench.run import write

    _raise_nofile()
    report = asyncio.run(soak(args))
    write("soak", report)
    print(json.dumps({"verdict": report["verdict"],
                      "slopes_mb_per_hour": {k: m["slope_mb_per_hour"] for k, m in report["memory"].items()}}))


if __name__ == "__main__":
    main()
