#!/usr/bin/env bash
# Unpack systemd 254's tools (systemd-sysupdate, the judge of forge update
# and --slots 2, and systemd-bless-boot, which the NixOS module's guard
# asks whether this boot is marked good) from Debian's bookworm-backports
# into DIR, beside the system's systemd 252, never installed over it:
# `dpkg -x` of systemd, systemd-boot and libsystemd-shared, fetched with
# apt lists of their own (the system's apt state is not touched).
# Idempotent: nothing is done when DIR has them.
# Run: LD_LIBRARY_PATH=DIR/usr/lib/x86_64-linux-gnu/systemd DIR/lib/systemd/systemd-sysupdate
set -euo pipefail
out=${1:?usage: systemd-tools.sh DIR}
if [ -x "$out/lib/systemd/systemd-sysupdate" ] && [ -x "$out/lib/systemd/systemd-bless-boot" ]; then
  exit 0
fi
mkdir -p "$out"
work=$(realpath "$(mktemp -d "$out.XXXXXX")")
trap 'rm -rf "$work"' EXIT
# The system's Debian mirror, with the backports suite.
uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
uri=${uri%% *}
: "${uri:=http://deb.debian.org/debian}"
cat > "$work/backports.sources" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
mkdir -p "$work/lists/partial" "$work/debs"
apt_own=(-o Dir::Etc::sourcelist="$work/backports.sources" -o Dir::Etc::sourceparts=-
  -o Dir::State::Lists="$work/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
  -o APT::Sandbox::User=root)
apt-get "${apt_own[@]}" update -qq
(cd "$work/debs" && apt-get "${apt_own[@]}" download systemd/bookworm-backports systemd-boot/bookworm-backports libsystemd-shared/bookworm-backports >/dev/null)
for d in "$work"/debs/*.deb; do
  dpkg -x "$d" "$work/x"
done
ver=$(LD_LIBRARY_PATH="$work/x/usr/lib/x86_64-linux-gnu/systemd" "$work/x/lib/systemd/systemd-sysupdate" --version | head -1)
case $ver in
  "systemd 25"[4-9]*|"systemd 2"[6-9]*) ;;
  *) echo "systemd-tools: backports gave \"$ver\", not systemd 254 or later" >&2; exit 1 ;;
esac
[ -x "$work/x/lib/systemd/systemd-bless-boot" ] || { echo "systemd-tools: no lib/systemd/systemd-bless-boot in backports' systemd-boot" >&2; exit 1; }
rm -rf "$out"
mv "$work/x" "$out"
echo "systemd-tools: $ver in $out"
