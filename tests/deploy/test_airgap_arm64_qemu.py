"""The air-gapped bundle on ARM64, as an ARM user goes through it, emulated by qemu-user on this machine
(tools/airgap/arm64.py try): the bundle unpacked into a bare Debian bookworm arm64 root filesystem (Python
3.11, no compiler), install.sh run with no network, then kefu up there, one document stored and one
question answered with its citation. Tens of minutes under emulation, so not in make test:
`make airgap-test-arm64` builds the aarch64 wheel and the bundle and runs this (as root)."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
BUNDLE = Path(os.environ.get("KEFU_AIRGAP_BUNDLE", ROOT / "dist" / f"kefu-airgap-{VERSION}.tar.gz"))
REPORT = ROOT / "bench" / "results" / "airgap-arm64.json"

pytestmark = [pytest.mark.qemu, pytest.mark.e2e, pytest.mark.model, pytest.mark.timeout(3 * 3600)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (debootstrap, chroot, namespaces, binfmt_misc)")
def test_bundle_installs_and_answers_on_arm64(request):
    if request.config.getoption("markexpr") != "qemu":
        pytest.skip("tens of minutes: runs only when asked for, pytest -m qemu (make airgap-test-arm64)")
    assert BUNDLE.exists(), f"{BUNDLE} is missing: make airgap-bundle"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "airgap" / "arm64.py"), "try", str(BUNDLE),
                          "--report", str(REPORT)], capture_output=True, text=True, timeout=3 * 3600 - 60)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(REPORT.read_text())
    # The bundle's own wheel of llama-cpp-python, not a build: the rootfs has no compiler.
    assert report["llama_cpp_python_install"] == "wheel", report
    assert report["bundle_llama_cpp_python"].startswith("wheel llama_cpp_python-")
    assert report["torch"].startswith("2.10.0")
    assert "129" in report["reply"]["text"] and report["reply"]["citations"] == ["lamp"]
    assert report["exit_code"] == 0
