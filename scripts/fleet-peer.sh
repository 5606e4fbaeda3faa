#!/usr/bin/env bash
# make bench's peer for `forge vm` (issue 31): the same files for each
# machine made with the usual tools, one after another: a boot overlay
# (qemu-img create -b BASE), an identity disk (the machine's files, a
# machine-id, an ssh-keygen host key pair, on a small ext4 labelled
# identity, mkfs.ext4 -d), a /var disk (1 GiB ext4 labelled state,
# converted to qcow2), then sync. No domain XML (forge writes one too).
# Usage: fleet-peer.sh BASE.qcow2 MACHINES_DIR OUT_DIR
set -euo pipefail
base=$(realpath "$1") machines=$2 out=$3
for m in "$machines"/*/; do
  n=$(basename "$m")
  d=$out/$n
  mkdir -p "$d/identity"
  qemu-img create -q -f qcow2 -F qcow2 -b "$base" "$d/boot.qcow2"
  cp -r "$m". "$d/identity/"
  systemd-id128 new > "$d/identity/machine-id"
  ssh-keygen -q -t ed25519 -N '' -C '' -f "$d/identity/ssh_host_ed25519_key"
  truncate -s 8M "$d/identity.img"
  mkfs.ext4 -q -L identity -d "$d/identity" "$d/identity.img"
  rm -rf "$d/identity"
  truncate -s 1G "$d/var.raw"
  mkfs.ext4 -q -L state "$d/var.raw"
  qemu-img convert -q -O qcow2 "$d/var.raw" "$d/var.qcow2"
  rm "$d/var.raw"
done
sync
