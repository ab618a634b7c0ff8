#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm, built from Debian's own packages, for machines that reach a
# Debian mirror and PyPI but no container registry (Docker Hub blocked, no registry mirror): the kefu
# Dockerfiles take their base through ARG PYTHON_IMAGE, and this image gives them what they rely on in
# the official one — Debian bookworm, `python`/`python3` on /usr/local/bin (Debian's python3.11), the
# venv module, pip, ca-certificates, apt sources for the build stage's compilers, useradd — and nothing
# more (minbase, no docs, no apt lists).
#
#   tools/images/base.sh [--arch amd64|arm64] [--tag NAME] [--mirror URL] [--workdir DIR]
#
# Needs root, debootstrap and buildah; --arch arm64 on an x86-64 host needs qemu-user-static with its
# binfmt handler registered (make images-binfmt). The image lands in buildah's local store.
set -euo pipefail

arch=$(dpkg --print-architecture)
tag=
mirror=
workdir=.kefu/images
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --mirror) mirror=$2; shift 2 ;;
        --workdir) workdir=$2; shift 2 ;;
        *) echo "usage: $0 [--arch amd64|arm64] [--tag NAME] [--mirror URL] [--workdir DIR]" >&2; exit 2 ;;
    esac
done
case "$arch" in amd64 | arm64) ;; *) echo "unsupported architecture $arch" >&2; exit 2 ;; esac
# STORAGE_DRIVER (overlay, or vfs where overlay mounts fail) picks buildah's store, as for make images.
buildah=(buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"})
tag=${tag:-localhost/kefu-base/python:3.11-slim-bookworm-$arch}

# The mirror this machine's apt already uses (deb822 or one-line sources), so the build needs no other host.
if [ -z "$mirror" ]; then
    mirror=$(sed -n 's/^URIs: *\([^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
    [ -n "$mirror" ] || mirror=$(sed -n 's/^deb  *\(http[^ ]*debian\)\/*  *bookworm .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n1)
    mirror=${mirror:-http://deb.debian.org/debian}
fi
security=${mirror%/debian}/debian-security

if [ "$arch" != "$(dpkg --print-architecture)" ] && [ ! -e "/proc/sys/fs/binfmt_misc/qemu-${arch/arm64/aarch64}" ]; then
    echo "no binfmt handler for $arch: run make images-binfmt first" >&2
    exit 1
fi

root="$workdir/rootfs-$arch"
rm -rf "$root"
mkdir -p "$root"
echo "debootstrap bookworm/$arch from $mirror into $root"
debootstrap --variant=minbase --arch="$arch" \
    --include=python3.11,python3.11-venv,python3-venv,python3-pip,ca-certificates,netbase,tzdata \
    bookworm "$root" "$mirror"

# The same trimming as Debian's slim images (docker-debian-artifacts): no docs, man pages or locales now
# or in later apt installs, no apt lists.
mkdir -p "$root/etc/dpkg/dpkg.cfg.d" "$root/etc/apt/apt.conf.d"
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::GzipIndexes "true";
Acquire::Languages "none";
EOF
echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/docker-no-recommends"

# Release, updates and security, as in the official debian:bookworm image: the build stage's apt-get
# update sees the same suites.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# Security updates now, like the official image's regular rebuilds (chroot runs arm64 through binfmt).
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive && apt-get update -q && apt-get upgrade -y -q && apt-get clean'

# Where the official image has its interpreter: Dockerfiles and venvs made from them name /usr/local/bin/python.
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3.11"
ln -sf python3.11 "$root/usr/local/bin/python3"
ln -sf python3.11 "$root/usr/local/bin/python"

rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* "$root"/tmp/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
: >"$root/etc/resolv.conf"
: >"$root/etc/hostname"
find "$root/usr/lib/python3.11" -name __pycache__ -prune -exec rm -rf {} +

ctr=$("${buildah[@]}" from --arch "$arch" --os linux scratch)
trap '"${buildah[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt=$("${buildah[@]}" mount "$ctr")
cp -a "$root/." "$mnt/"
"${buildah[@]}" umount "$ctr" >/dev/null
"${buildah[@]}" config --arch "$arch" --os linux \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd python3 \
    --label org.opencontainers.image.description="Debian bookworm minbase + Debian python3.11 (stand-in for python:3.11-slim-bookworm)" \
    "$ctr"
"${buildah[@]}" commit --rm "$ctr" "$tag" >/dev/null
trap - EXIT
rm -rf "$root"
echo "built $tag ($("${buildah[@]}" inspect --format '{{.OCIv1.Architecture}}' "$tag"))"
