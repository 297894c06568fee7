#!/bin/sh
# Build the throw-away Debian bookworm root disk the systemd guest boots
# (`vng --systemd --root-disk`), as root on the host:
#   build-root.sh OUT.img
# The launcher caches OUT.img under a name made from this file's hash, so any
# change here (a package, a hook) builds a new image; nothing else does.
# Recipe and the reason for every hook: ../../../shared/systemd-guest.md, section 2.
set -eu
img=${1:?usage: build-root.sh OUT.img}
work=$(mktemp -d "${img%/*}/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# the archive apt uses on this machine, else Debian's own
src=/etc/apt/sources.list.d/debian.sources
mirror=$(awk '/^URIs:/{print $2}' "$src" 2>/dev/null | sed -n 1p)
secmirror=$(awk '/^URIs:/{print $2}' "$src" 2>/dev/null | sed -n 2p)
mirror=${mirror:-http://deb.debian.org/debian}
secmirror=${secmirror:-http://deb.debian.org/debian-security}
# systemd, the bus, polkitd and udev as on a real host; the .deb's Depends, so
# `dpkg -i` works offline in the guest; python3-pytest runs the checks there.
pkgs=systemd,systemd-sysv,dbus,polkitd,pkexec,udev,kmod,procps,less,util-linux
pkgs=$pkgs,python3,python3-dbus-fast,python3-pyudev,python3-psutil,python3-systemd,python3-prometheus-client,python3-pytest,libnuma1,numactl
mmdebstrap --mode=root --variant=apt --skip=cleanup/reproducible --include="$pkgs" \
    --customize-hook='echo sysd-guest > "$1/etc/hostname"' \
    --customize-hook='printf "127.0.0.1 localhost\n127.0.1.1 sysd-guest\n" > "$1/etc/hosts"' \
    --customize-hook='systemd-id128 new > "$1/etc/machine-id"' \
    --customize-hook='mkdir -p "$1/mnt/sysd" "$1/lib/modules"; touch "$1/etc/fstab"' \
    --customize-hook='mkdir -p "$1/etc/systemd/journald.conf.d"; printf "[Journal]\nStorage=volatile\n" > "$1/etc/systemd/journald.conf.d/volatile.conf"' \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages' \
    bookworm "$work/rootfs" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" "deb $secmirror bookworm-security main"
mkfs.ext4 -q -F -L sysdroot -d "$work/rootfs" "$work/root.img" 2G
mv "$work/root.img" "$img"
