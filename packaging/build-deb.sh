#!/bin/sh
# Build the kvmnumad .deb from this source tree into OUTDIR (default: dist/).
#   packaging/build-deb.sh [OUTDIR]
# Installs the Debian build dependencies first when they are missing (needs root).
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$src/dist}" && cd "${1:-$src/dist}" && pwd)
deps="debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools dpkg-dev"

missing=""
for p in $deps; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "build-deb: installing$missing"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tree="$work/kvmnumad"
mkdir "$tree"
# The working tree without what a developer's machine adds to it.
tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./dist --exclude=./build \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.pytest_cache --exclude=./.numa-guest --exclude=./.systemd-guest -cf - . | tar -C "$tree" -xf -
cp -r "$src/packaging/debian" "$tree/debian"
# KVMNUMAD_DEB_VERSION=0.1.1 builds the same tree as a higher version (an upgrade to install over
# this one: the systemd guest checks that dpkg's restart of the service keeps the VMs).
if [ -n "${KVMNUMAD_DEB_VERSION:-}" ]; then
    { printf 'kvmnumad (%s) unstable; urgency=medium\n\n  * Rebuilt as a higher version.\n\n' "$KVMNUMAD_DEB_VERSION"
      printf ' -- kvmnumad developers <kvmnumad@localhost>  %s\n\n' "$(date -R)"
      cat "$src/packaging/debian/changelog"; } > "$tree/debian/changelog"
fi
# pyproject.toml names README.md as the long description; setuptools refuses to build without it.
[ -f "$tree/README.md" ] || echo "kvmnumad: KVM virtual machines with NUMA-aware placement" > "$tree/README.md"

# The distribution's python3 builds the package, not one a developer put first on PATH (pyenv, a venv).
(cd "$tree" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b)
cp "$work"/*.deb "$out"/
ls "$out"/kvmnumad_*.deb
