"""python -m bench.report (``make bench-report``, and the last step of ``make bench``): every
bench/results/*.json in one page, bench/report.md.

Up front the figures the reliability work is judged by (sessions held, the FAQ path's turns/s and p99,
the generation path's time to first token and tokens/s, each beside the raw engine or the bare step it
wraps), then durability, chaos and the soak, then a table per benchmark: each figure, its baseline from
the same run where the JSON pairs one, and their ratio. The benchmarks report medians unless a column says
otherwise (p95, p99, max). A benchmark that has not been run is named as missing, not guessed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
OUT = Path(__file__).parent / "report.md"
# The results the last report was made from (committed beside it): a benchmark not run since keeps its
# figures, with their date, instead of dropping out of the page.
RECORD = Path(__file__).parent / "report.json"
MAX_ROWS = 40  # per benchmark in the generic tables; the JSON has the rest
# Sections of their own below; everything else gets the generic table.
OWN_SECTION = {"load", "durability", "chaos", "soak"}
SKIP_KEYS = {"benchmark", "machine", "when", "what", "note", "series", "method", "model", "quick", "carried"}


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3g}"
        return f"{v:.2g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x)}" for k, x in v.items()) or "none"
    return str(v).replace("|", "\\|").replace("\n", " ")


def ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and b:
        return a / b
    return None


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c.replace("|", "\\|") for c in row) + " |"
            for row in rows]
    return out + [""]


def dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def load_results(results: Path, record: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every benchmark's JSON in ``results``; with ``record`` (the JSON of the last report), the benchmarks
    not run since are taken from it, marked ``carried: true`` (their ``when`` says from when)."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(results.glob("*.json")):
        try:
            out[f.stem] = json.loads(f.read_text())
        except ValueError as exc:
            out[f.stem] = {"unreadable": str(exc)}
    earlier: dict[str, Any] = {}
    if record is not None and record.exists():
        try:
            earlier = json.loads(record.read_text())
        except ValueError:
            earlier = {}
    for name, data in earlier.items():
        if name not in out and isinstance(data, dict) and "unreadable" not in data:
            out[name] = {**data, "carried": True}
    return dict(sorted(out.items()))


# The generic table: figure / baseline / ratio pairs found by their names.

def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def pairs(obj: Any, prefix: str = "") -> list[list[Any]]:
    """Rows (name, figure, baseline, ratio) of a benchmark's JSON: a ``figure`` dict beside a ``baseline``
    dict (the same or a similar key), ``figure_x`` beside ``baseline_y`` keys of one object, and every
    other number on its own."""
    rows: list[list[Any]] = []
    if not isinstance(obj, dict):
        return rows
    fig, base = obj.get("figure"), obj.get("baseline")
    used: set[str] = set()
    if isinstance(fig, dict) and isinstance(base, dict):
        used |= {"figure", "baseline"}
        base_left = {k: v for k, v in base.items() if _numeric(v)}
        for k, v in fig.items():
            if not _numeric(v):
                continue
            match = k if k in base_left else next((b for b in base_left if b.split("_")[-1] == k.split("_")[-1]
                                                   and b.split("_")[0] == k.split("_")[0]), None)
            b = base_left.pop(match) if match else None
            rows.append([prefix + k, v, b, ratio(v, b)])
        rows += [[prefix + "baseline " + k, None, v, None] for k, v in base_left.items()]
    figs = [k for k in obj if k.startswith("figure_") and _numeric(obj[k])]
    bases = [k for k in obj if k.startswith("baseline_") and _numeric(obj[k])]
    for f, b in zip(figs, bases, strict=False):
        used |= {f, b}
        rows.append([prefix + f[len("figure_"):] + f" (baseline: {b[len('baseline_'):]})", obj[f], obj[b],
                     ratio(obj[f], obj[b])])
    for k, v in obj.items():
        if k in used or k in SKIP_KEYS:
            continue
        if _numeric(v):
            rows.append([prefix + k, v, None, None])
        elif isinstance(v, dict):
            rows += pairs(v, f"{prefix}{k}.")
    return rows


def generic_section(name: str, data: dict[str, Any]) -> list[str]:
    rows = pairs(data)
    lines = [f"### {name}", "", f"`bench/results/{name}.json`, {data.get('when', 'undated')}."]
    what = data.get("what") or dig(data, "figure", "what")
    if what:
        lines[-1] += f" {fmt(what)}."
    lines.append("")
    if not rows:
        return lines + ["No numeric figures.", ""]
    shown = rows[:MAX_ROWS]
    lines += table(["figure", "value", "baseline (same run)", "ratio"], shown)
    if len(rows) > MAX_ROWS:
        lines += [f"{len(rows) - MAX_ROWS} more numbers in the JSON.", ""]
    return lines


# The sections of their own.

def headline(r: dict[str, dict[str, Any]]) -> list[str]:
    rows: list[list[Any]] = []
    load = r.get("load")
    if load:
        f, b = load["figure"], load["baseline"]
        phases = load.get("phases", {})
        rows.append(["concurrent visitor WebSocket sessions held, every turn answered (largest phase)",
                     f["sessions_held"], "—", None])
        rows.append(["FAQ path turns/s, 1 replica (closed loop, think time "
                     f"{fmt(load['settings']['think_s'])} s)", f["faq_turns_per_s"],
                     f"{fmt(b['searches_per_s'])} bare searches/s", ratio(f["faq_turns_per_s"], b["searches_per_s"])])
        for key, p in phases.items():
            if key.startswith("faq-") and key != "faq-1":
                rows.append([f"FAQ path turns/s, {key[4:]} replicas", p["turns_per_s"],
                             f"{fmt(f['faq_turns_per_s'])} on 1 replica", ratio(p["turns_per_s"], f["faq_turns_per_s"])])
        rows.append(["FAQ path p50 / p99 end to end (visitor send → reply)",
                     f"{fmt(f['faq_p50_ms'])} / {fmt(f['faq_p99_ms'])} ms",
                     f"{fmt(b['search_p50_ms'])} / {fmt(b['search_p99_ms'])} ms bare search; "
                     f"{fmt(b['healthz_p50_ms'])} / {fmt(b['healthz_p99_ms'])} ms GET /healthz",
                     ratio(f["faq_p99_ms"], b["search_p99_ms"])])
        rows.append(["generation path: time to first token under load (inference's own, mean)",
                     f"{fmt(f['gen_ttft_ms'])} ms", f"{fmt(b['raw_ttft_ms'])} ms raw llama-cpp-python, idle",
                     ratio(f["gen_ttft_ms"], b["raw_ttft_ms"])])
        rows.append(["generation path: first delta at the visitor, p50 (search, prompt, queue included)",
                     f"{fmt(f['gen_visitor_first_delta_p50_ms'])} ms", f"{fmt(b['raw_ttft_ms'])} ms raw",
                     ratio(f["gen_visitor_first_delta_p50_ms"], b["raw_ttft_ms"])])
        rows.append(["generation path: tokens per generation second under load (prompt + decode)",
                     f["gen_tokens_per_generation_s"], f"{fmt(b['raw_tokens_per_generation_s'])} raw",
                     ratio(f["gen_tokens_per_generation_s"], b["raw_tokens_per_generation_s"])])
        rows.append(["the same prompt through one idle inference replica: TTFT",
                     f"{fmt(f['gen_idle_service_ttft_ms'])} ms", f"{fmt(b['raw_ttft_ms'])} ms raw",
                     ratio(f["gen_idle_service_ttft_ms"], b["raw_ttft_ms"])])
        rows.append(["the same: decode tokens/s", f["gen_idle_service_decode_tokens_per_s"],
                     f"{fmt(b['raw_decode_tokens_per_s'])} raw",
                     ratio(f["gen_idle_service_decode_tokens_per_s"], b["raw_decode_tokens_per_s"])])
        rows.append(["turns lost / duplicated / errors, every phase", f"{f['lost_turns']} / {f['duplicated_turns']} / "
                     f"{f['errors']}", "—", None])
    inf = r.get("inference")
    if inf:
        rows.append(["inference service decode tokens/s (bench.run, fixed prompt, 128 tokens)",
                     dig(inf, "figure", "decode_tokens_per_s"),
                     f"{fmt(dig(inf, 'baseline', 'decode_tokens_per_s'))} raw", inf.get("ratio_decode")])
        rows.append(["inference service time to first token (bench.run)",
                     f"{fmt(1000 * dig(inf, 'figure', 'ttft_s'))} ms",
                     f"{fmt(1000 * dig(inf, 'baseline', 'ttft_s'))} ms raw", inf.get("ratio_ttft")])
    soak = r.get("soak")
    if soak:
        slopes = {k: m["slope_mb_per_hour"] for k, m in soak["memory"].items()}
        rows.append([f"soak, {fmt(soak['minutes'])} min ({soak['path']} path): memory",
                     f"{soak['verdict']} (slopes MB/h: {fmt(slopes)})", f"≤ {fmt(soak['flat_mb_per_hour'])} MB/h",
                     None])
    for scenario, c in (r.get("chaos") or {}).items():
        if isinstance(c, dict) and "lost" in c:
            acked = c.get("messages_acknowledged", c.get("acknowledged"))
            rows.append([f"chaos `{scenario}` ({fmt(c.get('scale', ''))}): acknowledged messages lost / duplicated",
                         f"{fmt(c['lost'])} / {fmt(c.get('duplicated'))} of {fmt(acked)}", "0 / 0", None])
    dur = dig(r, "durability", "summary")
    if dur:
        rows.append(["JetStream ack, sync_interval always, one node (p50)", f"{fmt(dur['single_always_p50_ms'])} ms",
                     f"{fmt(dur['single_default_p50_ms'])} ms default sync interval",
                     ratio(dur["single_always_p50_ms"], dur["single_default_p50_ms"])])
    if not rows:
        return ["No results yet: run `make bench` (or `python -m bench.load`).", ""]
    missing = [n for n in ("load", "inference", "durability", "chaos", "soak") if n not in r]
    out = table(["what", "figure", "baseline (same run)", "ratio"], rows)
    if missing:
        out += ["Not run for this report: " + ", ".join(f"`{m}`" for m in missing) + ".", ""]
    carried = [n for n, d in r.items() if d.get("carried")]
    if carried:
        out += ["Not run since the last report, their figures kept from it (`bench/report.json`, with their "
                "dates): " + ", ".join(f"`{c}` ({str(r[c].get('when', 'undated'))[:10]})" for c in carried) + ".", ""]
    return out


def load_section(load: dict[str, Any]) -> list[str]:
    s = load["settings"]
    lines = ["## Load (`python -m bench.load`)", "",
             f"{load['when']}; {s['sessions']} FAQ-path sessions for {fmt(s['seconds'])} s, {s['gen_sessions']} "
             f"generation-path sessions for {fmt(s['gen_seconds'])} s, think time {fmt(s['think_s'])} s "
             f"(exponential), {int(s['ws_share'] * 100)} % WebSockets, the rest HTTP with SSE; "
             f"a knowledge base of {s['kb_documents']} documents, {s['questions']} questions. "
             f"{load['note'][0].upper()}{load['note'][1:]}.", ""]
    rows = []
    for key, p in load["phases"].items():
        rows.append([key, f"{p['replicas']['gateway']}/{p['replicas']['dialogue']}/{p['replicas']['inference']}",
                     p["sessions"]["ws_held_and_answered"], p["turns"]["ok"], p["turns_per_s"],
                     p["latency"]["p50_ms"], p["latency"]["p95_ms"], p["latency"]["p99_ms"], p["ttft"]["p50_ms"],
                     p["turns"]["errors_by_code"], f"{p['stored']['lost']} / {p['stored']['duplicated']}",
                     p["load_average"]["median"]])
    lines += table(["phase", "replicas gw/dlg/inf", "WS sessions held", "turns", "turns/s", "p50 ms", "p95 ms",
                    "p99 ms", "first delta p50 ms", "errors by code", "lost / dup", "load avg"], rows)
    names = sorted({n for p in load["phases"].values() for n in p["processes"]})
    rows = [[key, *(f"{fmt(p['processes'][n]['rss_mb'])} MB, {fmt(p['processes'][n]['cpu_cores'])} cores"
                    if n in p["processes"] else "—" for n in names)] for key, p in load["phases"].items()]
    lines += ["Memory (RSS at the end, all replicas) and CPU (cores busy over the phase) per service:", ""]
    lines += table(["phase", *names], rows)
    e = load["engine_baseline"]
    lines += [f"Baselines, stack idle: bare search {fmt(dig(load, 'search_baseline', 'sequential', 'p50_ms'))} ms p50 "
              f"sequential, {fmt(dig(load, 'search_baseline', 'concurrent', 'searches_per_s'))}/s with "
              f"{load['search_baseline']['concurrency']} in flight; GET /healthz "
              f"{fmt(dig(load, 'healthz_baseline', 'sequential', 'p50_ms'))} ms p50, "
              f"{fmt(dig(load, 'healthz_baseline', 'concurrent', 'requests_per_s'))}/s. Generation, dialogue's "
              f"prompt ({s['prompt_chars']} characters, {e['max_tokens']} tokens at most, {e['threads']} threads, "
              f"{e['runs']} runs each): raw TTFT {fmt(e['raw']['ttft_ms'])} ms, decode "
              f"{fmt(e['raw']['decode_tokens_per_s'])} tokens/s; one idle inference replica "
              f"{fmt(e['service_idle']['ttft_ms'])} ms, {fmt(e['service_idle']['decode_tokens_per_s'])} tokens/s.", ""]
    return lines


def durability_section(d: dict[str, Any]) -> list[str]:
    lines = ["## Durability (`python -m bench.durability`)", "",
             f"{d['when']}; JetStream acks on a CONV-like stream ({d['setup']['payload_bytes']}-byte events), "
             "`sync_interval: always` (what kefu runs) against the default in the same run.", ""]
    rows = []
    for key, label in (("single_replicas_1", "one node"), ("cluster_3_replicas_3", "3 nodes, R3")):
        c = d.get(key)
        if not c:
            continue
        for what, get in (("ack p50 ms", ("sequential_ack_ms", "p50")), ("ack p99 ms", ("sequential_ack_ms", "p99")),
                          ("acks/s in flight", ("concurrent_acks_per_s",))):
            a, b = dig(c["always"], *get), dig(c["default"], *get)
            rows.append([f"{label}: {what}", a, b, ratio(a, b)])
    return lines + table(["figure (sync always)", "value", "baseline (default sync interval)", "ratio"], rows)


def chaos_section(c: dict[str, Any]) -> list[str]:
    lines = ["## Chaos (`tests/chaos`, `make test-chaos`)", "", f"{c.get('when', 'undated')}.", ""]
    rows = []
    for scenario, figures in c.items():
        if scenario in SKIP_KEYS or not isinstance(figures, dict):
            continue
        for k, v in figures.items():
            rows.append([scenario, k, v if not isinstance(v, (list, dict)) else json.dumps(v)])
    return lines + (table(["scenario", "figure", "value"], rows) if rows else ["No figures.", ""])


def soak_section(s: dict[str, Any]) -> list[str]:
    lines = ["## Soak (`make soak`, by hand)", "",
             f"{s['when']}; {fmt(s['minutes'])} minutes of the {s['path']} path, {s['settings']['sessions']} visitors "
             f"at once, each asking {s['settings']['turns_per_session']} questions before a new one takes its place; "
             f"RSS every {fmt(s['sample_every_s'])} s, a least-squares line after {fmt(s['warmup_minutes'])} minutes "
             f"of warm-up. Verdict: **{s['verdict']}** (flat: ≤ {fmt(s['flat_mb_per_hour'])} MB/h).", ""]
    rows = [[name, m["rss_mb_after_warmup"], m["rss_mb_at_end"], m["rss_mb_peak"], m["slope_mb_per_hour"],
             m.get("mb_per_1000_conversations"), m["flat"]] for name, m in s["memory"].items()]
    lines += table(["process", "RSS after warm-up MB", "at the end MB", "peak MB", "slope MB/h",
                    "MB per 1,000 conversations", "flat"], rows)
    ld = s["load"]
    lines += [f"{ld['turns']['ok']} turns answered ({fmt(ld['turns_per_s'])}/s, p50 {fmt(ld['latency']['p50_ms'])} ms, "
              f"p99 {fmt(ld['latency']['p99_ms'])} ms), errors {fmt(ld['turns']['errors_by_code'])}; "
              f"{ld['sessions']['conversations']} conversations, {ld['stored']['lost']} acknowledged messages lost, "
              f"{ld['stored']['duplicated']} duplicated; load average {fmt(s['load_average']['median'])} (median).", ""]
    return lines


def render(r: dict[str, dict[str, Any]]) -> str:
    load_avgs = [dig(d, "load_average", "median") for d in (r.get("soak"),) if d]
    load_avgs += [v for v in (dig(r.get("load", {}), "load_average", "phases_median") or {}).values()]
    cpus = next((d["machine"]["cpus"] for d in r.values() if isinstance(d.get("machine"), dict)), os.cpu_count())
    plat = next((d["machine"]["platform"] for d in r.values() if isinstance(d.get("machine"), dict)),
                platform.platform())
    dates = sorted(d["when"][:10] for d in r.values() if isinstance(d.get("when"), str))
    la = [v for v in load_avgs if isinstance(v, (int, float))]
    lines = ["# kefu performance report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench-report` "
             "(`python -m bench.report`) from `bench/results/*.json` and, for what was not run since, `bench/report.json`"
             + (f", benchmarks run {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "") if dates else "")
             + f". Machine: {cpus} cores, {plat}.",
             "",
             "Each figure is measured beside its baseline in the same run (the raw engine, or the bare step the "
             "service wraps); medians unless a column says p95/p99/max. "
             + (f"The machine's 1-minute load average during the load phases: {fmt(min(la))}–{fmt(max(la))} on "
                f"{cpus} cores. " if la else "")
             + "The development machine is shared (several sessions building and testing at once), so absolute "
             "figures are noisy and low; ratios to the same-run baselines drift much less.", "",
             "## The figures the reliability work asks for", ""]
    lines += headline(r)
    if "load" in r:
        lines += load_section(r["load"])
    if "durability" in r:
        lines += durability_section(r["durability"])
    if "chaos" in r:
        lines += chaos_section(r["chaos"])
    if "soak" in r:
        lines += soak_section(r["soak"])
    others = [n for n in r if n not in OWN_SECTION]
    if others:
        lines += ["## Every other benchmark", "",
                  "Figures as each benchmark's JSON names them; a baseline and ratio where the JSON pairs a figure "
                  "with one (bench/README.md says what each measures).", ""]
        for name in others:
            lines += generic_section(name, r[name])
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--record", type=Path, default=RECORD,
                    help="the last report's results: read for benchmarks not run since, then rewritten")
    ap.add_argument("--fresh", action="store_true", help="only what bench/results holds now")
    args = ap.parse_args()
    results = load_results(args.results, None if args.fresh else args.record)
    args.out.write_text(render(results))
    args.record.write_text(json.dumps({k: {x: y for x, y in v.items() if x != "carried"} for k, v in results.items()},
                                      indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out} and {args.record}")


if __name__ == "__main__":
    main()
