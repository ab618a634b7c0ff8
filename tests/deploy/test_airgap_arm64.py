"""The aarch64 side of the air-gapped bundle, the parts that are fast (tools/airgap/arm64.py): a wheel's
manylinux tag is computed from the newest glibc symbol its libraries use, so pip refuses it exactly where
it would not load; and the llama-cpp-python wheel that `make airgap-wheel-arm64` built, when it is in
.kefu/wheels, holds only aarch64 libraries that need nothing a bare Debian or RHEL node lacks (no libgomp,
no libssl) and is the version the bundle takes. The bundle installed and run on ARM64 under qemu-user is
`make airgap-test-arm64` (tests/deploy/test_airgap_arm64_qemu.py, tens of minutes)."""

import base64
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import parse_wheel_filename

from kefu.shared.testing import load_tool

ROOT = Path(__file__).resolve().parents[2]
CROSS_CC = shutil.which("aarch64-linux-gnu-gcc")
BUILT = sorted((ROOT / ".kefu" / "wheels").glob("llama_cpp_python-*_aarch64.whl"))
# What the wheel's libraries may link besides each other: glibc's and the C++ runtime (libstdc++, libgcc_s),
# which every Debian and RHEL base system has (apt and dnf need them).
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "ld-linux-aarch64.so.1",
               "libstdc++.so.6", "libgcc_s.so.1"}


arm64 = load_tool(ROOT / "tools" / "airgap" / "arm64.py", "airgap_arm64")


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def wheel_with(path: Path, files: dict[str, bytes]) -> Path:
    """A wheel tagged for the building machine (as pip wheel tags a cross-compiled build) holding ``files``."""
    info = "demo-1.0.dist-info"
    files = {**files, f"{info}/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                              b"Tag: cp311-cp311-linux_x86_64\n"}
    record = "\n".join([*(record_line(n, d) for n, d in files.items()), f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", record)
    return path


def cross_compile(tmp_path: Path, source: str) -> bytes:
    (tmp_path / "lib.c").write_text(source)
    subprocess.run([CROSS_CC, "-shared", "-fPIC", "-O1", "-o", str(tmp_path / "lib.so"), str(tmp_path / "lib.c")],
                   check=True, capture_output=True, timeout=60)
    return (tmp_path / "lib.so").read_bytes()


@pytest.mark.skipif(CROSS_CC is None, reason="no aarch64 cross compiler (Debian: gcc-aarch64-linux-gnu)")
@pytest.mark.parametrize(("call", "glibc"), [("puts(\"x\")", "2.17"), ("getrandom(b, 8, 0)", "2.25"),
                                              ("arc4random()", "2.36")])
def test_the_tag_names_the_newest_glibc_the_libraries_use(tmp_path, call, glibc):
    lib = cross_compile(tmp_path, "#define _GNU_SOURCE\n#include <stdio.h>\n#include <stdlib.h>\n"
                                  "#include <sys/random.h>\nchar b[8];\nlong f(void) { return (long)" + call + "; }\n")
    built = wheel_with(tmp_path / "demo-1.0-cp311-cp311-linux_x86_64.whl", {"demo/lib/libdemo.so": lib})
    assert arm64.needs(built)["GLIBC"] == glibc
    out = tmp_path / "out"
    out.mkdir()
    tagged = arm64.retag(built, out)
    assert tagged.name == f"demo-1.0-cp311-cp311-manylinux_2_{glibc.split('.')[1]}_aarch64.whl"
    with zipfile.ZipFile(tagged) as z:
        assert z.read("demo/lib/libdemo.so") == lib
        assert f"Tag: cp311-cp311-manylinux_2_{glibc.split('.')[1]}_aarch64" in z.read(
            "demo-1.0.dist-info/WHEEL").decode()


def test_a_library_for_another_machine_is_refused(tmp_path):
    # This machine's own Python extension module: not aarch64 unless this machine is.
    own = Path(zipfile.__file__).parent / "lib-dynload"
    lib = next(p for p in sorted(own.glob("*.so")))
    if "AArch64" in subprocess.run(["readelf", "-h", str(lib)], capture_output=True, text=True).stdout:
        pytest.skip("this machine is aarch64")
    built = wheel_with(tmp_path / "demo-1.0-cp311-cp311-linux_x86_64.whl", {"demo/lib/libdemo.so": lib.read_bytes()})
    with pytest.raises(SystemExit, match="libdemo.so is not an aarch64 library"):
        arm64.needs(built)


@pytest.mark.skipif(not BUILT, reason="no aarch64 llama-cpp-python wheel in .kefu/wheels (make airgap-wheel-arm64)")
def test_the_built_llama_wheel(tmp_path):
    wheel = BUILT[-1]
    name, version, _, tags = parse_wheel_filename(wheel.name)
    glibc = arm64.needs(wheel)["GLIBC"]  # every library is an aarch64 one, or this raises
    assert {t.platform for t in tags} == {f"manylinux_2_{max(17, int(glibc.split('.')[1]))}_aarch64"}
    assert Requirement(arm64.llama_requirement()).specifier.contains(version)
    with zipfile.ZipFile(wheel) as z:
        libs = [n for n in z.namelist() if re.search(r"\.so(\.\d+)*$", n)]
        z.extractall(tmp_path, members=libs)
    own = {Path(n).name for n in libs}
    assert {"libllama.so", "libggml.so"} <= own, own
    for n in libs:
        dynamic = subprocess.run(["readelf", "-d", str(tmp_path / n)], capture_output=True, text=True).stdout
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic))
        assert needed <= SYSTEM_LIBS | own, f"{n} needs {needed - SYSTEM_LIBS - own}"
    installed = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; "
                                "print(m.version('llama-cpp-python'))"], capture_output=True, text=True)
    if installed.returncode == 0:  # the same llama-cpp-python as this machine's
        assert installed.stdout.strip() == str(version)


def fitting_wheels(tmp_path: Path, wheels: dict[str, bytes]) -> tuple[list[str], str]:
    """install.sh's choice of a bundled aarch64 llama-cpp-python wheel (its embedded Python, run here):
    each wheel holding one library with ``bytes``; the ones it takes, and what it said of the others."""
    script = (ROOT / "tools" / "airgap" / "install.sh").read_text()
    snippet = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S)[1]
    d = tmp_path / "aarch64"
    d.mkdir()
    for name, lib in wheels.items():
        with zipfile.ZipFile(d / name, "w") as z:
            z.writestr("llama_cpp/lib/libllama.so", lib)
    run = subprocess.run([sys.executable, "-", str(d)], input=snippet, capture_output=True, text=True, check=True)
    return run.stdout.split(), run.stderr


def test_install_takes_the_wheel_only_where_libstdcxx_has_what_it_needs(tmp_path):
    # Any libstdc++ since GCC 5 defines GLIBCXX_3.4.21, none 3.4.999; the glibc here is older than 2.99.
    fits, said = fitting_wheels(tmp_path, {
        "llama_cpp_python-1-py3-none-manylinux_2_34_aarch64.whl": b"\0GLIBC_2.34\0GLIBCXX_3.4.21\0CXXABI_1.3\0",
        "llama_cpp_python-2-py3-none-manylinux_2_34_aarch64.whl": b"\0GLIBC_2.34\0GLIBCXX_3.4.999\0",
        "llama_cpp_python-3-py3-none-manylinux_2_99_aarch64.whl": b"\0GLIBC_2.99\0",
    })
    assert fits == ["llama_cpp_python-1-py3-none-manylinux_2_34_aarch64.whl"]
    assert "needs GLIBCXX_3.4.999, which this libstdc++ lacks" in said
