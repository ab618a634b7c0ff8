"""bench/report.py keeps a benchmark that was not run since the last report (from bench/report.json, with
its date, said so on the page) and takes a fresh run's figures over it."""

import json

from bench import report


def test_a_benchmark_not_run_since_is_carried_with_its_date(tmp_path):
    results, record = tmp_path / "results", tmp_path / "report.json"
    results.mkdir()
    (results / "chaos.json").write_text(json.dumps({"benchmark": "chaos", "when": "2026-12-02T20:00:00+0000"}))
    record.write_text(json.dumps({"chaos": {"benchmark": "chaos", "when": "2026-11-01T00:00:00+0000"},
                                  "inference": {"benchmark": "inference", "when": "2026-11-20T10:00:00+0000",
                                                "figure": {"decode_tokens_per_s": 5.7, "ttft_s": 0.3},
                                                "baseline": {"decode_tokens_per_s": 6.3, "ttft_s": 0.27}}}))
    merged = report.load_results(results, record)
    assert merged["chaos"]["when"].startswith("2026-12-02") and not merged["chaos"].get("carried")
    assert merged["inference"]["carried"] is True and merged["inference"]["figure"]["decode_tokens_per_s"] == 5.7
    page = report.render(merged)
    assert "`inference` (2026-11-20)" in page and "Not run since the last report" in page
    assert "inference" not in report.load_results(results, None)
