#!/bin/sh
# Builds the llmos image with Debian's rootful podman, on a base made with debootstrap (no
# registry needed). Usage: tools/build_image.sh [cpu|cuda]; IMAGE_WORK is where podman keeps its
# storage, kept between runs and clones like any build cache (default ~/.cache/llmos/image): the
# base and the dependency layer are made once, a change to the code rebuilds one small layer.
# Prints the podman command to use it.
set -eu
TORCH=${1:-cpu}
TAG=$([ "$TORCH" = cuda ] && echo cuda || echo cpu)
W=$(realpath -m "${IMAGE_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/llmos/image}")
mkdir -p "$W"
export DEBIAN_FRONTEND=noninteractive
command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
  || { apt-get update -q >/dev/null && apt-get install -y -q podman buildah debootstrap runc >/dev/null; }
# runc (crun refuses hybrid cgroups here) and rlimits within what this user may set.
NOFILE=$(awk '/^Max open files/{print $5}' /proc/self/limits); NPROC=$(cat /proc/sys/kernel/pid_max)
HU=$(awk '/^Max processes/{print $4}' /proc/self/limits)
if [ "$HU" != unlimited ] && [ "$HU" -lt "$NPROC" ]; then NPROC=$HU; fi
[ "$NOFILE" = unlimited ] && NOFILE=65536
cat > "$W/containers.conf" <<EOC
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
EOC
export CONTAINERS_CONF="$W/containers.conf"
P="podman --root $W/storage --runroot $W/run"
if ! $P image exists localhost/llmos-base:bookworm; then
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  rm -rf "$W/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$W/rootfs" "$MIRROR" >/dev/null
  rm -rf "$W"/rootfs/var/lib/apt/lists/* "$W"/rootfs/var/cache/apt/*.bin "$W"/rootfs/var/cache/apt/archives/*.deb
  tar -C "$W/rootfs" -c . | $P import -q - localhost/llmos-base:bookworm >/dev/null
  rm -rf "$W/rootfs"
fi
MOUNTS=""
[ -f /etc/ssl/certs/ca-certificates.crt ] && MOUNTS="-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro"
if [ "$TORCH" = cpu ]; then
  WHEELS=$(pip config get global.find-links 2>/dev/null || true)
  WHEELS=${TORCH_WHEELS:-${WHEELS:-/opt/wheels}}
  MOUNTS="$MOUNTS -v $WHEELS:/run/wheels:ro"
fi
# What the Containerfile copies besides the tree: the dependency list (pyproject.toml's) and the
# client's wheel, its stubs generated from protos/ by the venv's grpcio-tools.
PY=${PYTHON:-.venv/bin/python}
rm -rf build/image && mkdir -p build/image/wheels
"$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
  > build/image/requirements.txt
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w build/image/wheels clients/python >/dev/null
# shellcheck disable=SC2086
$P build -q --isolation=chroot $MOUNTS --build-arg TORCH="$TORCH" -f deploy/Containerfile -t "localhost/llmos:$TAG" . >/dev/null
$P image prune -f >/dev/null    # the image this build replaced; the layers it reused stay
echo "CONTAINERS_CONF=$W/containers.conf $P run --rm localhost/llmos:$TAG --help"
