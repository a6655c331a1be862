#!/usr/bin/env bash
# Real OCI build of the operator image (images/operator/Dockerfile) without Docker and without a
# container registry: Debian's buildah (vfs storage, chroot isolation) over a local stand-in for
# python:3.11-slim-bookworm made with debootstrap from Debian's packages.
#
#   sudo images/operator/build-with-buildah.sh <repository root> <work dir>
#
# Run as root on Debian bookworm (buildah 1.28.2). Steps, each skipped when its result exists:
#   1. apt-get install buildah debootstrap
#   2. build context = `git archive HEAD` of the repository, with the working tree's
#      images/operator/Dockerfile and Dockerfile.dockerignore laid over it
#      (SNAPSHOT=worktree instead copies the working tree's tracked and untracked-not-ignored files)
#   3. debootstrap --variant=minbase bookworm, then python3 + pip + python-is-python3 in a chroot,
#      EXTERNALLY-MANAGED (PEP 668) removed so pip behaves as in the official image, apt lists cleaned
#   4. that rootfs committed as localhost/python:3.11-slim-bookworm-debootstrap
#   5. buildah bud of images/operator/Dockerfile with --build-arg PYTHON_IMAGE=<that base>
#   6. the image's entry point run once, its user checked, its size and config printed,
#      and an OCI archive written to <work dir>/metroline-operator-<tag>.oci.tar
#
# Environment knobs:
#   MIRROR      Debian mirror for debootstrap and the chroot (default http://deb.debian.org/debian)
#   CA_BUNDLE   CA bundle bind-mounted read-only over /etc/ssl/certs/ca-certificates.crt for the
#               Dockerfile's RUN steps only (pip reaches PyPI through it; nothing of it stays in the
#               image). Default: this machine's /etc/ssl/certs/ca-certificates.crt, which is needed
#               where egress TLS is intercepted by a local CA. Set CA_BUNDLE= to mount nothing.
#   SNAPSHOT    head (default) or worktree, see step 2
#   TAG         image tag (default 0.1.0)
#   REBUILD_BASE=1  rebuild the rootfs and the base image even if they exist
#
# Last run here (2026-12-01, HEAD c8f2e4b, 2 loaded cores, buildah 1.28.2): 280 s from an
# empty work dir (debootstrap included); base 199 MB, operator image 232 MB (OCI archive
# 92 MB); `id` in the image: uid=1000(metroline) gid=1000(metroline); `python -P -m
# metroline.operator --help` exits 0. Behind a TLS-intercepting proxy pip in the RUN steps
# needs the host's CA bundle (CA_BUNDLE); buildah 1.28 needs --ignorefile for the
# per-Dockerfile ignore file, and --storage-driver vfs on every call (STORAGE_DRIVER is not read).
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 <repository root> <work dir>" >&2
    exit 64
fi
REPO=$(cd "$1" && pwd)
WORK=$(mkdir -p "$2" && cd "$2" && pwd)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
SNAPSHOT=${SNAPSHOT:-head}
TAG=${TAG:-0.1.0}
REBUILD_BASE=${REBUILD_BASE:-0}

BASE_IMAGE=localhost/python:3.11-slim-bookworm-debootstrap
IMAGE=localhost/metroline-operator:${TAG}
CTX=$WORK/ctx
ROOTFS=$WORK/rootfs
# buildah 1.28 ignores a STORAGE_DRIVER environment variable here (an image committed with
# --storage-driver vfs is then not found), so the flag goes on every call.
B=(buildah --storage-driver vfs)

step() { printf '\n=== %s (t=%ss)\n' "$*" "$SECONDS"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "run as root (debootstrap, chroot and buildah's vfs store under /var/lib/containers)" >&2
    exit 1
fi

step "1. buildah and debootstrap"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q buildah debootstrap
fi
buildah --version

step "2. build context ($SNAPSHOT) -> $CTX"
rm -rf "$CTX"
mkdir -p "$CTX"
case $SNAPSHOT in
    head)
        git -C "$REPO" archive HEAD | tar -x -C "$CTX"
        cp "$REPO/images/operator/Dockerfile" "$REPO/images/operator/Dockerfile.dockerignore" \
            "$CTX/images/operator/"
        ;;
    worktree)
        (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
            | tar --null --ignore-failed-read -T - -cf -) | tar -x -C "$CTX"
        ;;
    *) echo "SNAPSHOT must be head or worktree" >&2; exit 64 ;;
esac
echo "HEAD $(git -C "$REPO" rev-parse HEAD)"

if [[ $REBUILD_BASE == 1 ]]; then
    rm -rf "$ROOTFS"
    "${B[@]}" rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
fi

step "3. debootstrap rootfs -> $ROOTFS"
if [[ ! -e $ROOTFS/.python-ready ]]; then
    rm -rf "$ROOTFS"
    debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR"
    # The official image's suites: bookworm, bookworm-updates, bookworm-security.
    cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    # "E: Can not write log (Is /dev/pts mounted?)" from apt in this chroot is harmless.
    chroot "$ROOTFS" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get update -q
    chroot "$ROOTFS" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends ca-certificates python3 python3-pip python3-venv python-is-python3
    chroot "$ROOTFS" apt-get clean
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/apt/* "$ROOTFS"/var/cache/apt/*.bin
    # PEP 668: the official python image has no such marker; without removing it, the
    # Dockerfile's `pip install` fails with error: externally-managed-environment.
    rm -f "$ROOTFS/usr/lib/python3.11/EXTERNALLY-MANAGED"
    : >"$ROOTFS/etc/resolv.conf"
    chroot "$ROOTFS" python --version
    chroot "$ROOTFS" python -m pip --version
    chroot "$ROOTFS" sh -c 'command -v useradd'
    touch "$ROOTFS/.python-ready"
fi

step "4. base image $BASE_IMAGE"
if ! "${B[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    "${B[@]}" rm base-build >/dev/null 2>&1 || true
    ctr=$("${B[@]}" from --name base-build scratch)
    mnt=$("${B[@]}" mount "$ctr")
    # /dev, /proc and /sys stay empty (the runtime provides them); no .deb cache, no marker.
    tar -C "$ROOTFS" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        --exclude='./var/cache/apt/archives/*.deb' --exclude='./.python-ready' -cf - . \
        | tar -C "$mnt" -xpf -
    "${B[@]}" umount "$ctr"
    # Env and CMD as in python:3.11-slim-bookworm (its python lives in /usr/local; Debian's in /usr).
    "${B[@]}" config \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 \
        --cmd '["python3"]' --os linux --arch amd64 \
        --label org.opencontainers.image.description="Debian bookworm minbase (debootstrap) + python3 3.11, python-is-python3, pip; EXTERNALLY-MANAGED removed" \
        "$ctr"
    "${B[@]}" commit "$ctr" "$BASE_IMAGE"
    "${B[@]}" rm "$ctr"
fi

step "5. buildah bud $IMAGE"
# --ignorefile: buildah 1.28 does not pick up images/operator/Dockerfile.dockerignore by itself
# (it sent the whole context in a probe); BuildKit does.
# The `# syntax=` line is a BuildKit directive; buildah ignores it.
# No --network flag: with chroot isolation the RUN steps use the host's network.
bud=("${B[@]}" bud --isolation chroot --pull=never
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE"
    --ignorefile "$CTX/images/operator/Dockerfile.dockerignore"
    -f "$CTX/images/operator/Dockerfile" -t "$IMAGE")
if [[ -n $CA_BUNDLE ]]; then
    bud+=(--volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi
old_id=$("${B[@]}" images --quiet --no-trunc "$IMAGE" 2>/dev/null || true)
"${bud[@]}" "$CTX"
# A rebuild leaves the previous image untagged; drop it so reruns do not pile up copies.
new_id=$("${B[@]}" images --quiet --no-trunc "$IMAGE")
if [[ -n $old_id && $old_id != "$new_id" ]]; then
    "${B[@]}" rmi "$old_id" >/dev/null 2>&1 || true
fi

step "6. run the entry point once"
"${B[@]}" rm op-run >/dev/null 2>&1 || true
"${B[@]}" from --pull=never --name op-run "$IMAGE" >/dev/null
"${B[@]}" run --isolation chroot op-run -- id
rc=0
"${B[@]}" run --isolation chroot op-run -- python -P -m metroline.operator --help || rc=$?
echo "entry point --help exit status: $rc"
"${B[@]}" rm op-run >/dev/null

"${B[@]}" images
"${B[@]}" inspect --type image "$IMAGE" | python3 -c \
    'import json, sys; c = json.load(sys.stdin)["OCIv1"]["config"]; print(json.dumps({k: c.get(k) for k in ("User", "Entrypoint", "Cmd", "ExposedPorts", "Env")}, indent=1))'
"${B[@]}" push "$IMAGE" "oci-archive:$WORK/metroline-operator-$TAG.oci.tar"
ls -l "$WORK/metroline-operator-$TAG.oci.tar"
step "done"
