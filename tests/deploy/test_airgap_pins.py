"""How the air-gapped bundle picks each architecture's versions (tools/airgap/build.py), without a network:
the torch pins that kefu-retrieval's real wheel carries for x86-64 and aarch64, and the closure check that
finds what a set of wheels still needs on an architecture, follows extras, and refuses a file whose version
the requirement excludes (pip would fail on it offline)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kefu.shared.testing import load_tool

ROOT = Path(__file__).resolve().parents[2]


build = load_tool(ROOT / "tools" / "airgap" / "build.py", "airgap_build")


@pytest.fixture(scope="module")
def retrieval_wheel(tmp_path_factory) -> Path:
    """kefu-retrieval's wheel, built from services/retrieval as make airgap-bundle builds it."""
    out = tmp_path_factory.mktemp("own")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "--wheel-dir", str(out), str(ROOT / "services" / "retrieval")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return next(out.glob("kefu_retrieval-*.whl"))


def wheel(d: Path, filename: str, requires: list[str]) -> Path:
    """A wheel file named ``filename`` whose metadata requires ``requires`` (what unmet reads of it)."""
    name, ver = filename.split("-")[:2]
    path = d / filename
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{ver}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n{meta}")
    return path


def test_torch_is_pinned_per_architecture(retrieval_wheel):
    assert build.arch_pins([retrieval_wheel], "x86_64") == {"torch": "2.13.0"}
    # PyPI's newest aarch64 torch without CUDA requirements; 2.11 and later need cuda-toolkit on every Linux.
    assert build.arch_pins([retrieval_wheel], "aarch64") == {"torch": "2.10.0"}


def test_unmet_follows_markers_and_extras(tmp_path, retrieval_wheel):
    anyd, archd = tmp_path / "any", tmp_path / "aarch64"
    anyd.mkdir()
    archd.mkdir()
    (anyd / retrieval_wheel.name).write_bytes(retrieval_wheel.read_bytes())
    wheel(archd, "torch-2.10.0-cp311-cp311-manylinux_2_28_aarch64.whl",
          ["filelock", 'nvidia-nccl-cu12==2.27.5; platform_machine == "x86_64"'])
    wheel(anyd, "kefu_shared-0.1.0-py3-none-any.whl", [])
    wheel(anyd, "builder-1.0-py3-none-any.whl", ["scikit-build-core[pyproject]>=0.9.2"])
    wheel(anyd, "scikit_build_core-0.11.0-py3-none-any.whl",
          ["packaging>=21", 'pathspec>=0.10.1; extra == "pyproject"', 'rich; extra == "rich"'])
    missing = {str(r) for r in build.unmet("aarch64", [anyd, archd])}
    # torch is there; its x86-64-only CUDA requirement does not apply; the pyproject extra's pathspec does.
    assert missing == {"numpy>=1.26", "faiss-cpu>=1.8", "sentence-transformers>=3", "filelock", "packaging>=21",
                       'pathspec>=0.10.1; extra == "pyproject"'}


def test_a_version_the_requirement_excludes_is_refused(tmp_path, retrieval_wheel):
    anyd, archd = tmp_path / "any", tmp_path / "aarch64"
    anyd.mkdir()
    archd.mkdir()
    (anyd / retrieval_wheel.name).write_bytes(retrieval_wheel.read_bytes())
    wheel(archd, "torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl", [])
    with pytest.raises(SystemExit, match=r"aarch64: kefu_retrieval-.* requires torch==2\.10\.0.*, the bundle has "
                                         r"torch-2\.13\.0-cp311-cp311-manylinux_2_28_aarch64\.whl"):
        build.unmet("aarch64", [anyd, archd])
    # The same file is what x86-64 wants (the local label +cpu of the CPU build matches ==2.13.0 too).
    wheel(archd, "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", [])
    (archd / "torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl").unlink()
    assert "torch" not in {r.name for r in build.unmet("x86_64", [anyd, archd])}
