#!/usr/bin/env bash
# Install what nixforge's tests, demo and benchmarks need, on Debian 12, as
# root. Idempotent and non-interactive: packages already present are not
# touched, and apt runs only when something is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

pkgs=(
  nix-bin                       # real Nix: fixture stores, the judge for closures and NAR hashes
  busybox-static                # fixture builder and stage 1
  systemd-boot-efi              # systemd-bootx64.efi for the fixture system
  cpio kmod                     # initrd assembly
  e2fsprogs dosfstools mtools   # e2fsck/debugfs, fsck.fat, mdir
  gdisk fdisk                   # sgdisk -v, sfdisk -V
  bmap-tools zstd               # bmaptool, zstd -t
  ovmf qemu-system-x86          # UEFI boots
  qemu-utils                    # qemu-img: judges qcow2, VHD, VHDX and VMDK (check, info, compare)
  libvirt-clients libxml2-utils # virsh (test:///default define), virt-xml-validate
  qemu-system-arm u-boot-qemu   # aarch64 boots through U-Boot
  util-linux                    # losetup, partx, setpriv, blkid, wipefs
  openssh-client                # ssh-keygen judges generated host keys
  hyperfine time                # make bench (time: peak RSS)
  man-db                        # man -l renders the installed man pages
  libc6-dev                     # libc.a: the static forge the Nix sandbox tests run
  skopeo umoci podman           # judges of forge oci: inspect/copy, unpack, load
  docker-registry               # a real registry on 127.0.0.1, started by the tests
  pigz                          # make bench: the peer of forge oci's gzip
  python3-fusepy fuse3          # the fake SD card (tests/tools/fakecard.py) flash's probe must refuse
  binutils                      # objdump: reads the Unified Kernel Images' PE sections
  cryptsetup-bin                # veritysetup: judges the dm-verity hash partition (verify, dump, format)
  sbsigntool                    # sbverify: judges forge's Authenticode signatures on systemd-boot and the UKIs
  systemd                       # systemd-veritysetup-generator: opens the verity root from a UKI's roothash= as an initrd would
  systemd-container             # systemd-dissect: reads verity partitions as systemd does; systemd-pull/-import, which sysupdate runs
  erofs-utils                   # fsck.erofs (--extract), dump.erofs: judge forge's EROFS
  xz-utils python3-yaml         # forge lxc: xz -t judges its tarballs, PyYAML its metadata.yaml
  xorriso                       # hybrid ISOs (foreign images flash writes); reads them back
  genisoimage                   # isoinfo: reads forge's ISOs (Rock Ridge, Joliet, El Torito)
  b3sum                         # BLAKE3 of the manifest's ranges, computed independently
  gpg gpgv                      # forge update --sign's SHA256SUMS.gpg: gpgv judges it, systemd-pull runs gpg
  tmux                          # flash station: its live rows, read with tmux capture-pane
)
# The arm64 busybox and kernel are only downloaded (apt-get download, by
# fixtures/make-systems.sh): installing busybox-static:arm64 would replace
# the host's. The arm64 architecture must be known to apt for that.

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status} ${Architecture}\n' "$p" 2>/dev/null \
    | grep -Eq "install ok installed (amd64|all)$" || missing+=("$p")
done
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  missing+=(arm64-architecture)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "deps: installing ${missing[*]}"
apt-get update -qq
install=()
for p in "${missing[@]}"; do
  case $p in
    arm64-architecture) ;;
    # The machine may carry qemu-utils from backports, which breaks
    # bookworm's qemu-system-*: take the matching bookworm builds.
    qemu-system-x86|qemu-system-arm) install+=("$p" qemu-utils/bookworm qemu-system-common/bookworm) ;;
    qemu-utils) install+=(qemu-utils/bookworm) ;;
    *) install+=("$p") ;;
  esac
done
[ ${#install[@]} -eq 0 ] || apt-get install -y -qq --allow-downgrades --no-install-recommends "${install[@]}" >/dev/null
