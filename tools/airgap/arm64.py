"""The ARM64 side of the air-gapped bundle, made and tried on an x86-64 machine (as root, Debian).

    python tools/airgap/arm64.py wheel  [--wheel-dir .kefu/wheels] [--version V] [--emulated]
    python tools/airgap/arm64.py rootfs [--rootfs dist/arm64-rootfs]
    python tools/airgap/arm64.py check  [--wheel W] [--report bench/results/airgap-arm64-wheel.json]
    python tools/airgap/arm64.py try    dist/kefu-airgap-<version>.tar.gz [--report bench/results/airgap-arm64.json]

``wheel``: llama-cpp-python for aarch64, so that an ARM node installs it without a compiler. Cross-compiled
with Debian's gcc-aarch64-linux-gnu (minutes), or with ``--emulated`` compiled by the rootfs's own gcc under
qemu-user (the same result, many times slower). llama.cpp's flags are those of services/inference/Dockerfile
(ARMv8.2 with dot product, never -march=native) and no OpenMP, so the wheel needs nothing beyond glibc and
libstdc++. Its tag is ``manylinux_2_<N>_aarch64`` with N the newest glibc symbol its libraries use: pip
refuses it on an older glibc (and builds the source the bundle also holds). Kept in ``--wheel-dir``, where
tools/airgap/build.py takes it from.

``rootfs``: a Debian bookworm arm64 root filesystem (``debootstrap --variant=minbase``) with Python 3.11 and
its venv module and no compiler: what a bare ARM64 node has.

``check``: the wheel installed in the rootfs with no network (its few dependencies fetched as aarch64
wheels first), then llama_cpp loads the default GGUF model and generates, emulated; timings and the text
go to a JSON report.

``try``: the bundle as an ARM64 user goes through it, emulated by qemu-user: unpacked into the rootfs,
install.sh run in a network namespace with no network (and pid and mount namespaces, so nothing outlives
it), then ``kefu up`` started there, one document stored and one question answered with its citation.
Sizes and timings go to a JSON report. Slow (emulation): run by hand (``make airgap-test-arm64``).

qemu-user's binfmt registration for aarch64 is made when it is missing (from Debian's qemu-user-static);
missing Debian packages (debootstrap, qemu-user-static, the cross compilers) are installed with apt-get.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import parse_sdist_filename

ROOT = Path(__file__).resolve().parents[2]
WHEEL_DIR = ROOT / ".kefu" / "wheels"
ROOTFS = ROOT / "dist" / "arm64-rootfs"
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# What a bare node needs for kefu: Python 3.11 with venv (install.sh makes a virtual environment).
NODE_PACKAGES = ["python3.11", "python3.11-venv", "ca-certificates"]
# --emulated: what compiling llama-cpp-python inside the rootfs needs on top.
BUILD_PACKAGES = ["build-essential", "cmake", "ninja-build"]
CROSS = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}
# services/inference/Dockerfile's LLAMA_CMAKE_ARGS_ARM64, no OpenMP (libgomp comes with gcc, which an ARM
# node installing a wheel need not have; ggml's own thread pool is used instead) and no OpenSSL (HTTPS for
# llama.cpp's downloader, which kefu never uses; cross-compiling, cmake would find this machine's x86-64 one).
LLAMA_FLAGS = "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod -DGGML_OPENMP=OFF -DLLAMA_OPENSSL=OFF"
CROSS_FLAGS = ("-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 "
               "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
READY = ".kefu-rootfs"  # the stamp of a finished rootfs: the packages it has, one a line


def log(msg: str) -> None:
    print(f"[arm64] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, **kw)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return done


def need_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("needs root (debootstrap, chroot, namespaces, binfmt_misc)")


def apt_install(packages: list[str]) -> None:
    log(f"apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env).returncode != 0:
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", *packages], env=env)


def need_commands(commands: dict[str, str]) -> None:
    """Install the Debian package of every command in ``commands`` (command -> package) that is missing."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if missing:
        apt_install(missing)


def binfmt() -> None:
    """Make sure aarch64 binaries run here (qemu-user through binfmt_misc), registering it when missing."""
    entry = BINFMT / "qemu-aarch64"
    if entry.exists() and entry.read_text().startswith("enabled"):
        return
    need_commands({"qemu-aarch64-static": "qemu-user-static"})
    if not (BINFMT / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
    if entry.exists():
        entry.write_text("1")
    else:
        if not BINFMT_CONF.exists():
            raise SystemExit(f"{BINFMT_CONF} is missing: apt-get install qemu-user-static")
        # The F flag opens the interpreter now, so the rootfs needs no copy of qemu.
        (BINFMT / "register").write_text(BINFMT_CONF.read_text().strip())
    log("registered qemu-user for aarch64 binaries (binfmt_misc)")


def in_rootfs(rootfs: Path, script: str, *, network: bool, env: dict[str, str] | None = None,
              timeout: float | None = None, log_file: Path | None = None) -> float:
    """Run ``script`` (sh) chrooted in ``rootfs`` in new pid and mount namespaces (every process it starts
    ends with it; /proc and /dev are mounted for it alone) and, unless ``network``, a network namespace
    with only a loopback. Returns the seconds it took."""
    base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
            "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", **(env or {})}
    assign = " ".join(f"{k}={_quote(v)}" for k, v in base.items())
    inner = (("" if network else "ip link set lo up && ")
             + f"mount -t proc proc {_quote(str(rootfs / 'proc'))} && "
             + f"mount --rbind /dev {_quote(str(rootfs / 'dev'))} && "
             + f"exec chroot {_quote(str(rootfs))} /usr/bin/env -i {assign} /bin/sh -ec {_quote(script)}")
    cmd = ["unshare", "--pid", "--fork", "--mount", "--propagation", "private",
           *([] if network else ["--net"]), "/bin/sh", "-ec", inner]
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"timed out after {timeout:.0f}s in the rootfs: {script[:200]}"
                         + (f" (log: {log_file})" if log_file else "")) from None
    finally:
        if out:
            out.close()
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}) in the rootfs: {script[:200]}"
                         + (f" (log: {log_file})" if log_file else ""))
    return time.monotonic() - t0


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def make_rootfs(rootfs: Path, extra: list[str] = ()) -> Path:
    """A Debian arm64 root filesystem with NODE_PACKAGES (and ``extra``); kept and reused."""
    need_root()
    binfmt()
    wanted = [*NODE_PACKAGES, *extra]
    stamp = rootfs / READY
    have = stamp.read_text().split() if stamp.exists() else None
    if have is None:
        need_commands({"debootstrap": "debootstrap"})
        if rootfs.exists():  # an unfinished one
            shutil.rmtree(rootfs)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        log(f"debootstrap {SUITE} arm64 into {rootfs} (second stage emulated: a few minutes)")
        t0 = time.monotonic()
        # minbase only: debootstrap's --include does not resolve dependencies as apt does.
        run(["nice", "-n", "19", "debootstrap", "--arch", "arm64", "--variant=minbase", SUITE, str(rootfs), MIRROR],
            stdout=subprocess.DEVNULL)
        log(f"debootstrap took {time.monotonic() - t0:.0f}s")
        have = []
    todo = [p for p in wanted if p not in have]
    if todo:
        shutil.copy("/etc/resolv.conf", rootfs / "etc" / "resolv.conf")
        log(f"apt-get install {' '.join(todo)} in the rootfs (emulated)")
        took = in_rootfs(rootfs, "apt-get update -q && apt-get install -y -q --no-install-recommends "
                         + " ".join(todo) + " && apt-get clean && rm -rf /var/lib/apt/lists/*", network=True)
        log(f"took {took:.0f}s")
        stamp.write_text("\n".join(sorted({*have, *todo})) + "\n")
    return rootfs


def llama_requirement() -> str:
    deps = tomllib.loads((ROOT / "services" / "inference" / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if Requirement(d).name == "llama-cpp-python")


def fetch_sdist(spec: str, dest: Path) -> Path:
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=llama-cpp-python", "--dest", str(dest), spec],
        stdout=subprocess.DEVNULL)
    return next(p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip")))


def build_wheel(wheel_dir: Path, version: str | None, emulated: bool, rootfs: Path) -> Path:
    """The aarch64 wheel of llama-cpp-python ``version`` (default: the newest that the inference service
    accepts) in ``wheel_dir``, built unless it is there already."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-aarch64-") as tmp:
        work = Path(tmp)
        spec = f"llama-cpp-python=={version}" if version else llama_requirement()
        sdist = fetch_sdist(spec, work)
        version = str(parse_sdist_filename(sdist.name)[1])
        cached = sorted(wheel_dir.glob(f"llama_cpp_python-{version}-*_aarch64.whl"))
        if cached:
            log(f"cached: {cached[-1]}")
            return cached[-1]
        log(f"building llama-cpp-python {version} for aarch64 ({'emulated' if emulated else 'cross-compiled'}; "
            f"log in {wheel_dir / 'build.log'})")
        t0 = time.monotonic()
        out = work / "out"
        out.mkdir()
        build_log = wheel_dir / "build.log"
        build_log.write_text("")
        if emulated:
            need_root()
            make_rootfs(rootfs, BUILD_PACKAGES)
            inside = rootfs / "tmp" / "llama-build"
            shutil.rmtree(inside, ignore_errors=True)
            inside.mkdir(parents=True)
            shutil.copy(sdist, inside / sdist.name)
            shutil.copy("/etc/resolv.conf", rootfs / "etc" / "resolv.conf")
            in_rootfs(rootfs, "python3.11 -m venv /tmp/llama-build/venv && "
                      f"CMAKE_ARGS='{LLAMA_FLAGS}' CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 19 /tmp/llama-build/venv/bin/pip wheel -v --no-deps "
                      f"--no-cache-dir -w /tmp/llama-build/out /tmp/llama-build/{sdist.name}",
                      network=True, log_file=build_log)
            built = next((inside / "out").glob("*.whl"))
            shutil.move(built, out / built.name)
            shutil.rmtree(inside, ignore_errors=True)
        else:
            need_commands(CROSS)
            # Two compile jobs unless told otherwise: the build shares the machine.
            env = dict(os.environ, CMAKE_ARGS=f"{CROSS_FLAGS} {LLAMA_FLAGS}",
                       CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
            with open(build_log, "ab") as f:
                run(["nice", "-n", "19", sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir",
                     "--wheel-dir", str(out), str(sdist)], env=env, stdout=f, stderr=subprocess.STDOUT)
        built = next(out.glob("*.whl"))
        took = time.monotonic() - t0
        wheel = retag(built, wheel_dir)
        log(f"built {wheel.name} in {took:.0f}s ({wheel.stat().st_size / 1e6:.1f} MB)")
        (wheel_dir / f"{wheel.name}.json").write_text(json.dumps({
            "wheel": wheel.name, "built": "emulated" if emulated else "cross-compiled", "seconds": round(took),
            "cmake_args": LLAMA_FLAGS, **needs(wheel)}, indent=1) + "\n")
        return wheel


def needs(wheel: Path) -> dict[str, str]:
    """The newest glibc, libstdc++ and C++ ABI symbol versions that the wheel's libraries use."""
    newest: dict[str, tuple[int, ...]] = {}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        libs = [n for n in z.namelist() if re.search(r"\.so(\.\d+)*$", n)]
        if not libs:
            raise SystemExit(f"{wheel.name}: no shared library in it")
        for name in libs:
            path = Path(z.extract(name, tmp))
            head = run(["readelf", "-h", str(path)], capture_output=True, text=True).stdout
            if "AArch64" not in head:
                raise SystemExit(f"{wheel.name}: {name} is not an aarch64 library")
            syms = run(["readelf", "-V", "-W", str(path)], capture_output=True, text=True).stdout
            for kind, ver in re.findall(r"\b(GLIBC|GLIBCXX|CXXABI)_(\d+(?:\.\d+)+)\b", syms):
                v = tuple(int(x) for x in ver.split("."))
                newest[kind] = max(newest.get(kind, v), v)
    return {kind: ".".join(map(str, v)) for kind, v in sorted(newest.items())}


def retag(built: Path, dest: Path) -> Path:
    """``built`` (tagged for the building machine) as a manylinux aarch64 wheel in ``dest``."""
    glibc = needs(built).get("GLIBC", "2.17")
    tag = f"manylinux_2_{max(17, int(glibc.split('.')[1]))}_aarch64"
    run([sys.executable, "-m", "wheel", "tags", "--remove", "--platform-tag", tag, str(built)],
        stdout=subprocess.DEVNULL)
    tagged = next(p for p in built.parent.glob("*.whl") if p.name.endswith(f"{tag}.whl"))
    return Path(shutil.move(tagged, dest / tagged.name))


# Run inside the rootfs by the check's python: the wheel's llama_cpp loads the GGUF and generates (greedy).
GENERATE = r'''
import json, sys, time
t0 = time.monotonic()
import llama_cpp
report = {"llama_cpp_python": llama_cpp.__version__, "import_s": round(time.monotonic() - t0, 1)}
t0 = time.monotonic()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
report["load_s"] = round(time.monotonic() - t0, 1)
t0 = time.monotonic()
out = llm.create_completion("Q: What is the capital of France?\nA:", max_tokens=24, temperature=0.0)
took = time.monotonic() - t0
report.update(generate_s=round(took, 1), prompt_tokens=out["usage"]["prompt_tokens"],
              tokens=out["usage"]["completion_tokens"], text=out["choices"][0]["text"])
report["tokens_per_s"] = round(report["tokens"] / took, 2)
print("REPORT " + json.dumps(report))
'''
# What llama_cpp imports, fetched as aarch64 wheels for the check (the versions pip picks today).
LLAMA_DEPS = ["numpy", "typing-extensions", "diskcache", "jinja2"]


def check_wheel(wheel: Path, rootfs: Path, model: Path, report_path: Path) -> dict:
    """Install ``wheel`` in the rootfs (no network, no compiler) and generate tokens from ``model`` with it."""
    need_root()
    make_rootfs(rootfs)
    if not model.is_file():
        raise SystemExit(f"{model} is missing: kefu models pull")
    work = rootfs / "opt" / "llama-check"
    shutil.rmtree(work, ignore_errors=True)
    (work / "wheels").mkdir(parents=True)
    log(f"fetching aarch64 wheels of {', '.join(LLAMA_DEPS)}")
    run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(work / "wheels"),
         "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64", "--platform",
         "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp", *LLAMA_DEPS],
        stdout=subprocess.DEVNULL)
    shutil.copy(wheel, work / "wheels" / wheel.name)
    shutil.copy(model, work / model.name)
    (work / "generate.py").write_text(GENERATE)
    log_file = report_path.with_suffix(".log")
    log_file.write_text("")
    log(f"installing {wheel.name} in the rootfs, no network, emulated (log: {log_file})")
    report: dict = {"wheel": wheel.name, "wheel_mb": round(wheel.stat().st_size / 1e6, 1), **needs(wheel),
                    "emulation": "qemu-user " + _qemu_version(), "model": model.name}
    report["install_s"] = round(in_rootfs(rootfs, "python3.11 -m venv /opt/llama-check/venv && "
                                          "/opt/llama-check/venv/bin/pip install -q --no-index --find-links "
                                          "/opt/llama-check/wheels llama-cpp-python", network=False,
                                          log_file=log_file), 1)
    log("generating (emulated)")
    in_rootfs(rootfs, f"/opt/llama-check/venv/bin/python /opt/llama-check/generate.py /opt/llama-check/{model.name}",
              network=False, log_file=log_file, timeout=1800)
    line = next(ln for ln in log_file.read_text().splitlines() if ln.startswith("REPORT "))
    report.update(json.loads(line[len("REPORT "):]))
    shutil.rmtree(work, ignore_errors=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    log(f"report: {report_path}")
    return report


def _qemu_version() -> str:
    done = subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True, text=True)
    return done.stdout.split("\n")[0].split("version")[-1].strip() if done.returncode == 0 else "?"


# Run inside the rootfs by the installed environment's python: kefu up, one document, one cited answer.
TRY = r'''
import json, os, signal, subprocess, sys, time, urllib.error, urllib.request
prefix, data, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
admin = "arm64-airgap-admin-token-0123456789"
def http(method, path, body=None, token=None, timeout=30):
    headers = {"Content-Type": "application/json", **({"Authorization": "Bearer " + token} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:8080" + path, data=data,
                                    method=method, headers=headers), timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)
report = {}
t0 = time.monotonic()
imports = subprocess.run([prefix + "/bin/python", "-c", "import torch, llama_cpp, kefu.gateway.app, "
    "kefu.dialogue.app, kefu.retrieval.app, kefu.inference.app, kefu.plugins.app; "
    "print(torch.__version__, llama_cpp.__version__)"], capture_output=True, text=True)
assert imports.returncode == 0, imports.stderr[-3000:]
report["import_all_s"] = round(time.monotonic() - t0, 1)
report["torch"], report["llama_cpp_python"] = imports.stdout.split()
log = open("/tmp/kefu-up.log", "wb")
proc = subprocess.Popen([prefix + "/bin/kefu", "up", "--data-dir", data], stdout=log, stderr=subprocess.STDOUT,
                        env=dict(os.environ, KEFU_ADMIN_TOKEN=admin, KEFU_READY_TIMEOUT=str(budget)),
                        start_new_session=True)
t0 = time.monotonic()
try:
    while http("GET", "/readyz", timeout=5)[0] != 200:
        assert proc.poll() is None, "kefu up ended: " + open("/tmp/kefu-up.log").read()[-3000:]
        assert time.monotonic() - t0 < budget, "not ready: " + open("/tmp/kefu-up.log").read()[-3000:]
        time.sleep(2)
    report["ready_s"] = round(time.monotonic() - t0, 1)
    t1 = time.monotonic()
    st, body = http("PUT", "/v1/tenants/shop/documents/lamp", {"title": "Desk lamp L2",
                    "text": "The L2 desk lamp costs 129 yuan."}, token=admin, timeout=600)
    assert st == 200, body
    report["document_s"] = round(time.monotonic() - t1, 1)
    st, body = http("POST", "/v1/tenants/shop/conversations", {})
    conv = json.loads(body)
    t1 = time.monotonic()
    st, body = http("POST", "/v1/conversations/%s/messages" % conv["conversation_id"],
                    {"text": "How much is the L2 desk lamp?"}, token=conv["visitor_token"], timeout=900)
    assert st == 200, body
    report["answer_s"] = round(time.monotonic() - t1, 1)
    reply = json.loads(body)["reply"]
    report["reply"] = reply
    assert "129" in reply["text"] and reply["citations"] == ["lamp"], reply
    # What produced it (the model, or the cited sentence when generation was too slow), as an admin sees it.
    st, body = http("GET", "/v1/conversations/" + conv["conversation_id"], token=admin)
    turns = json.loads(body)["turns"] if st == 200 else []
    report["provenance"] = next((t.get("provenance") for t in reversed(turns) if t["role"] == "bot"), None)
    t1 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    report["exit_code"] = proc.wait(120)
    report["stop_s"] = round(time.monotonic() - t1, 1)
finally:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
print("REPORT " + json.dumps(report))
'''


def try_bundle(tarball: Path, rootfs: Path, report_path: Path, budget: float) -> dict:
    """Install ``tarball`` in the rootfs with no network and answer one question from the stack there."""
    need_root()
    make_rootfs(rootfs)
    report: dict = {"bundle": tarball.name, "bundle_mb": round(tarball.stat().st_size / 1e6, 1),
                    "rootfs": f"Debian {SUITE} arm64 (debootstrap minbase + {' '.join(NODE_PACKAGES)}), "
                              "qemu-user emulation, no network"}
    sums = tarball.with_name(tarball.name + ".sha256")
    if sums.exists():
        run(["sha256sum", "--quiet", "-c", sums.name], cwd=tarball.parent)
    for stale in ("opt/kefu", "opt/bundle", "tmp/kefu-up.log"):
        p = rootfs / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (rootfs / "opt" / "bundle").mkdir(parents=True)
    log(f"unpacking {tarball.name} into {rootfs}/opt/bundle")
    with tarfile.open(tarball) as tar:
        tar.extractall(rootfs / "opt" / "bundle", filter="data")
    bundle = next((rootfs / "opt" / "bundle").iterdir())
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    if "aarch64" not in manifest["architectures"]:
        raise SystemExit(f"{tarball.name} has no aarch64 wheels")
    report["sizes_mb"] = {d.name: round(sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 1e6, 1)
                          for d in [*sorted((bundle / "wheels").iterdir()), bundle / "models", bundle / "chart"]}
    report["bundle_llama_cpp_python"] = manifest.get("llama-cpp-python", {}).get("aarch64")
    logs = report_path.parent / "arm64-try"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    inside = "/opt/bundle/" + bundle.name
    log("install.sh in the rootfs, no network, emulated (log: arm64-try/install.log)")
    # The wheel, not a build, must be what installs: a rootfs with a compiler (left by --emulated) is refused.
    no_compiler = ("if command -v cc || command -v gcc; then echo 'the rootfs has a C compiler: "
                   "make a new one (rm -r the rootfs)' >&2; exit 3; fi; ")
    report["install_s"] = round(in_rootfs(rootfs, f"{no_compiler}sh {inside}/install.sh /opt/kefu",
                                          network=False, timeout=budget, log_file=logs / "install.log"))
    log(f"installed in {report['install_s']}s")
    install_log = (logs / "install.log").read_text(errors="replace")
    report["llama_cpp_python_install"] = "wheel" if "llama-cpp-python from" in install_log else "compiled"
    report["venv_mb"] = round(sum(f.stat().st_size for f in (rootfs / "opt" / "kefu").rglob("*")
                                  if f.is_file() and not f.is_symlink()) / 1e6)
    (rootfs / "opt" / "kefu-try.py").write_text(TRY)
    log("kefu up in the rootfs, no network, emulated: ready, a document, a cited answer (log: arm64-try/up.log)")
    t0 = time.monotonic()
    in_rootfs(rootfs, f"/opt/kefu/bin/python /opt/kefu-try.py /opt/kefu /opt/kefu/data {budget:.0f}; "
              "status=$?; cp /tmp/kefu-up.log /opt/kefu/data/logs/ 2>/dev/null || true; exit $status",
              network=False, timeout=budget + 900, log_file=logs / "up.log")
    report["stack_total_s"] = round(time.monotonic() - t0)
    line = next(ln for ln in (logs / "up.log").read_text().splitlines() if ln.startswith("REPORT "))
    report.update(json.loads(line[len("REPORT "):]))
    for f in (rootfs / "opt" / "kefu" / "data" / "logs").glob("*.log"):
        shutil.copy(f, logs / f"service-{f.name}")
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    log(f"report: {report_path}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheel", help="build the aarch64 wheel of llama-cpp-python (once; cached)")
    w.add_argument("--wheel-dir", type=Path, default=WHEEL_DIR)
    w.add_argument("--version", help="default: the newest that services/inference accepts")
    w.add_argument("--emulated", action="store_true", help="compile in the arm64 rootfs under qemu-user")
    w.add_argument("--rootfs", type=Path, default=ROOTFS.with_name("arm64-build-rootfs"),
                   help="with --emulated: a rootfs that gets a compiler (not the one `try` uses)")
    r = sub.add_parser("rootfs", help="make the Debian arm64 root filesystem")
    r.add_argument("--rootfs", type=Path, default=ROOTFS)
    c = sub.add_parser("check", help="install the built wheel in the rootfs offline and generate tokens with it")
    c.add_argument("--wheel", type=Path, help="default: the newest aarch64 llama-cpp-python in --wheel-dir")
    c.add_argument("--wheel-dir", type=Path, default=WHEEL_DIR)
    c.add_argument("--model", type=Path, default=ROOT / ".kefu" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    c.add_argument("--rootfs", type=Path, default=ROOTFS)
    c.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "airgap-arm64-wheel.json")
    t = sub.add_parser("try", help="install a bundle in the rootfs offline and get one answer from it")
    t.add_argument("bundle", type=Path)
    t.add_argument("--rootfs", type=Path, default=ROOTFS)
    t.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "airgap-arm64.json")
    t.add_argument("--budget", type=float, default=3600, help="seconds for the install, and for the start")
    args = ap.parse_args(argv)
    if args.command == "wheel":
        build_wheel(args.wheel_dir, args.version, args.emulated, args.rootfs)
    elif args.command == "rootfs":
        make_rootfs(args.rootfs)
    elif args.command == "check":
        wheel = args.wheel or max(args.wheel_dir.glob("llama_cpp_python-*_aarch64.whl"), default=None,
                                  key=lambda p: p.stat().st_mtime)
        if wheel is None:
            raise SystemExit(f"no aarch64 wheel of llama-cpp-python in {args.wheel_dir}: arm64.py wheel")
        args.report.parent.mkdir(parents=True, exist_ok=True)
        print(json.dumps(check_wheel(wheel.resolve(), args.rootfs.resolve(), args.model.resolve(),
                                     args.report.resolve()), indent=1))
    else:
        print(json.dumps(try_bundle(args.bundle.resolve(), args.rootfs.resolve(), args.report.resolve(),
                                    args.budget), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
