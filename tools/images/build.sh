#!/usr/bin/env bash
# The five service images with buildah, from the Dockerfiles as they are (what `docker build` runs), on a
# machine with no Docker engine and no registry: the base is tools/images/base.sh's stand-in for
# python:3.11-slim-bookworm (built first when it is not in buildah's store), passed as PYTHON_IMAGE.
#
#   tools/images/build.sh [--arch amd64|arm64] [--wheels DIR] [--jobs N] [--rebuild-base] [SERVICE...]
#
# Tags: localhost/kefu/<service>:<version>-<arch>, and :<version> for this machine's architecture.
# Image sizes go to .kefu/images/sizes-<arch>.json and the build logs to .kefu/images/build-<service>-<arch>.log.
#
# What the build sees of this machine, only while a RUN step runs (a volume over root's home, /root: no
# layer keeps anything of it):
#   - its CA bundle, named in root's pip configuration, for a network whose egress re-signs TLS (pip
#     trusts only its own bundle otherwise);
#   - --wheels DIR (default: pip's find-links here, PIP_FIND_LINKS) at /root/wheels, as pip's
#     find-links: a torch wheel there (e.g. torch-2.13.0+cpu) is taken instead of the CPU-only torch
#     index, so the build needs PyPI alone. TORCH_INDEX=URL picks the index yourself.
# The Dockerfiles are unchanged by any of this: `docker build` elsewhere works as before.
#
# Needs root and buildah (STORAGE_DRIVER=vfs where overlay mounts fail; runc on a host with hybrid
# cgroups). --jobs (default 2) images are built at once; inference, which compiles llama.cpp (~5 min on
# 2 cores), starts first.
set -euo pipefail

cd "$(dirname "$0")/../.."
arch=$(dpkg --print-architecture)
wheels=${PIP_FIND_LINKS:-}
jobs=2
rebuild_base=
services=()
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch=$2; shift 2 ;;
        --wheels) wheels=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --rebuild-base) rebuild_base=1; shift ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        -*) echo "unknown option $1 (see $0 --help)" >&2; exit 2 ;;
        *) services+=("$1"); shift ;;
    esac
done
[ ${#services[@]} -gt 0 ] || services=(inference gateway dialogue plugins retrieval)
for s in "${services[@]}"; do
    [ -f "services/$s/Dockerfile" ] || { echo "no service $s (services/$s/Dockerfile)" >&2; exit 2; }
done
case "$arch" in amd64 | arm64) ;; *) echo "unsupported architecture $arch" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "buildah builds here as root (run with sudo)" >&2; exit 1; }
command -v buildah >/dev/null || { echo "buildah is missing (Debian: apt-get install buildah)" >&2; exit 1; }
case "$wheels" in *" "*) wheels=${wheels%% *} ;; esac  # pip's find-links may list several: the first
[ -z "$wheels" ] || [ -d "$wheels" ] || { echo "--wheels $wheels is not a directory" >&2; exit 2; }

buildah=(buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"})
# crun refuses a host with cgroup v1 and controllers on the v2 hierarchy too ("cgroups in hybrid mode not
# supported"); runc runs there. BUILDAH_RUNTIME chooses yourself.
runtime=${BUILDAH_RUNTIME:-}
if [ -z "$runtime" ] && grep -q . /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null && command -v runc >/dev/null; then
    runtime=runc
fi
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)
base=localhost/kefu-base/python:3.11-slim-bookworm-$arch
work=.kefu/images
mkdir -p "$work"

if [ -n "$rebuild_base" ] || ! "${buildah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
    tools/images/base.sh --arch "$arch" --tag "$base" --workdir "$work"
fi

# pip inside the build: a home of its own for root, mounted over the image's (empty) /root, so that no
# mount point is left in any layer: pip's user configuration naming this machine's CA bundle (a copy), and
# the local wheels at /root/wheels (a mount point inside that home) when there are any.
home=$work/build-home-$arch
rm -rf "$home"
mkdir -p "$home/.config/pip"
cp -L /etc/ssl/certs/ca-certificates.crt "$home/.config/pip/ca.crt"
{
    echo "[global]"
    echo "cert = /root/.config/pip/ca.crt"
    [ -z "$wheels" ] || echo "find-links = /root/wheels"
} >"$home/.config/pip/pip.conf"
mounts=(--volume "$PWD/$home:/root")
[ -z "$wheels" ] || mounts+=(--volume "$(realpath "$wheels"):/root/wheels:ro")
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
    # Emulated (qemu-user), a RUN step sees this machine's CPUs in /sys, not the target's: onnxruntime's
    # cpuinfo then crashes importing (arm64 on x86-64: a segfault in a thread, the step hangs). Hidden,
    # it falls back to its defaults, as in a chroot; a native build, and the image, see the real CPUs.
    mkdir -p "$work/no-cpu-sysfs"
    mounts+=(--volume "$PWD/$work/no-cpu-sysfs:/sys/devices/system/cpu:ro")
fi
machine=${arch/amd64/x86_64}
machine=${machine/arm64/aarch64}
torch_index=${TORCH_INDEX:-}
if [ -z "$torch_index" ] && [ -n "$wheels" ] && compgen -G "$wheels/torch-*-cp311-*_$machine.whl" >/dev/null; then
    # The local wheel (2.13.0+cpu sorts above PyPI's 2.13.0) wins; its dependencies come from PyPI.
    torch_index=https://pypi.org/simple
fi

build() {
    local s=$1 log=$work/build-$1-$arch.log tags=(--tag "localhost/kefu/$1:$version-$arch")
    [ "$arch" != "$(dpkg --print-architecture)" ] || tags+=(--tag "localhost/kefu/$1:$version")
    local start=$SECONDS
    rm -f "$work/built-$s-$arch"
    echo "building $s ($arch), log in $log"
    # Docker's image format: OCI's has no HEALTHCHECK and no SHELL, and buildah would drop both.
    # nice: the other jobs of this machine keep their share while llama.cpp compiles.
    if nice -n 10 "${buildah[@]}" bud ${runtime:+--runtime "$runtime"} --format docker --layers --pull=never --network host \
        --platform "linux/$arch" --build-arg "PYTHON_IMAGE=$base" \
        ${torch_index:+--build-arg "TORCH_INDEX=$torch_index"} \
        "${mounts[@]}" "${tags[@]}" -f "services/$s/Dockerfile" . >"$log" 2>&1; then
        echo "$((SECONDS - start))" >"$work/built-$s-$arch"
        echo "built localhost/kefu/$s:$version-$arch in $((SECONDS - start)) s"
    else
        echo "FAILED $s ($arch) after $((SECONDS - start)) s; last lines of $log:" >&2
        tail -n 20 "$log" >&2
    fi
}

# At most $jobs builds at once, in the order given (inference first: it takes longest).
for s in "${services[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 2; done
    build "$s" &
done
wait

# Seconds to build and size (MB, uncompressed layers as buildah counts them), one JSON per architecture.
failed=()
for s in "${services[@]}"; do [ -f "$work/built-$s-$arch" ] || failed+=("$s"); done
"${buildah[@]}" images --json | python3 -c '
import json, os, sys
version, arch, work, *services = sys.argv[1:]
units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}  # buildah writes "290 MB"
def size(text):
    number, unit = text.split()
    return int(float(number) * units[unit])
images = {name: size(i["size"]) for i in json.load(sys.stdin) for name in i.get("names") or ()}
path = f"{work}/sizes-{arch}.json"
out = json.load(open(path)) if os.path.exists(path) else {}  # earlier runs of other services stay
for s in services:
    name = f"localhost/kefu/{s}:{version}-{arch}"
    try:
        seconds = int(open(f"{work}/built-{s}-{arch}").read())
    except OSError:
        continue
    out[s] = {"image": name, "mb": round(images[name] / 1e6), "build_s": seconds}
    print(f"{name}  {images[name] / 1e6:.0f} MB  built in {seconds} s")
json.dump(out, open(path, "w"), indent=2)
' "$version" "$arch" "$work" "${services[@]}"
[ ${#failed[@]} = 0 ] || { echo "not built: ${failed[*]}" >&2; exit 1; }
