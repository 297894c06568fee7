#!/bin/sh
# Build the kvmnumad RPM from this source tree into OUTDIR (default: dist/).
#   packaging/build-rpm.sh [OUTDIR]
# On Debian, installs rpm (rpmbuild) and the Python build tools when missing (needs root).
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$src/dist}" && cd "${1:-$src/dist}" && pwd)
version=$(sed -n 's/^Version: *//p' "$src/packaging/rpm/kvmnumad.spec")

if ! command -v rpmbuild >/dev/null && command -v apt-get >/dev/null; then
    echo "build-rpm: installing rpm python3-build python3-installer python3-setuptools"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        rpm python3-build python3-installer python3-setuptools
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/SOURCES" "$work/kvmnumad-$version"
tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./dist --exclude=./build \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.pytest_cache -cf - . | tar -C "$work/kvmnumad-$version" -xf -
# pyproject.toml names README.md as the long description; setuptools refuses to build without it.
[ -f "$work/kvmnumad-$version/README.md" ] ||
    echo "kvmnumad: KVM virtual machines with NUMA-aware placement" > "$work/kvmnumad-$version/README.md"
tar -C "$work" -czf "$work/SOURCES/kvmnumad-$version.tar.gz" "kvmnumad-$version"

# The distribution's python3 builds the package, not one a developer put first on PATH.
env PATH=/usr/sbin:/usr/bin:/sbin:/bin rpmbuild -bb --define "_topdir $work" \
    "$src/packaging/rpm/kvmnumad.spec"
find "$work/RPMS" -name '*.rpm' -exec cp {} "$out"/ \;
ls "$out"/kvmnumad-"$version"-*.rpm
