"""Run the chaos suite several times in a row and record how many runs passed, in bench/results/chaos.json
(section ``runs``, per scale: runs, passed, the seconds each took and their median).

    python tests/chaos/repeat.py --times 5            # the short suite (what make test runs)
    python tests/chaos/repeat.py --times 1 --full     # make test-chaos
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "chaos.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="KEFU_CHAOS_SCALE=full")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments")
    args = parser.parse_args()
    scale = "full" if args.full else "short"
    env = dict(os.environ, KEFU_CHAOS_SCALE=scale)
    seconds: list[float] = []
    passed = 0
    for n in range(1, args.times + 1):
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", "pytest", "tests/chaos", "-q", "-p", "no:cacheprovider",
                              *args.pytest_args], cwd=ROOT, env=env)
        seconds.append(round(time.monotonic() - t0, 1))
        passed += rc == 0
        print(f"chaos run {n}/{args.times} ({scale}): {'passed' if rc == 0 else f'FAILED (rc {rc})'} "
              f"in {seconds[-1]} s", flush=True)
        tally(scale, seconds, passed, args.times)  # after every run: an interrupted series still counts
    return 0 if passed == args.times else 1


def tally(scale: str, seconds: list[float], passed: int, planned: int) -> None:
    # Read back each time: the scenarios wrote their own sections meanwhile.
    try:
        report = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        report = {}
    report.setdefault("runs", {})[scale] = {"runs": len(seconds), "planned": planned, "passed": passed,
                                            "in_a_row": passed == len(seconds), "seconds": seconds,
                                            "median_s": statistics.median(seconds),
                                            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
