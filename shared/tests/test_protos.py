import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "shared" / "src" / "kefu" / "proto"


def _check(target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check", "--target", str(target)],
                          capture_output=True, text=True, timeout=120)


def test_committed_generated_code_matches_the_protos():
    result = _check(GENERATED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_when_generated_code_differs(tmp_path):
    copy = tmp_path / "proto"
    shutil.copytree(GENERATED, copy, ignore=shutil.ignore_patterns("__pycache__"))
    victim = copy / "v1" / "conversations_pb2.py"
    victim.write_text(victim.read_text() + "\n# edited by hand\n")
    result = _check(copy)
    assert result.returncode == 1 and "v1/conversations_pb2.py" in result.stdout
