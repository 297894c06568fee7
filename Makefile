# kvmnumad: two commands on a fresh machine.
#   make run   install what is missing, start a private bus + kvmnumad + a demo VM
#   make test  install what is missing, lint, host suite, then the NUMA suite in 2-node, 4-node and
#              memory-only-node guests

SHELL := /bin/bash
PY ?= python3
VENV := $(CURDIR)/.venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian packages the project needs at test and run time (checked one by one, installed when missing).
APT_PACKAGES := dbus dbus-daemon dbus-bin polkitd util-linux numactl libnuma1 linux-libc-dev \
	libsystemd-dev pkg-config gcc systemd passwd \
	qemu-system-x86 linux-image-amd64 busybox-static udev \
	debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools dpkg-dev rpm \
	python3-dbus-fast python3-pyudev python3-psutil python3-systemd bash-completion strace \
	qtbase5-dev-tools qtbase5-dev g++ python3-gi gir1.2-glib-2.0 python3-prometheus-client
# the systemd guest's root image (tests/systemd_guest/build-root.sh)
APT_PACKAGES += mmdebstrap e2fsprogs

.PHONY: all deps run test lint test-host test-numa test-numa-storm test-numa-2 test-numa-4 test-numa-memonly bench bench-quick bench-deps deb rpm clean fuzz

# $(call apt_install,PACKAGES): install those of PACKAGES that dpkg does not have (one apt-get run).
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

all: test

deps: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(call apt_install,$(APT_PACKAGES))
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: deps
	$(VPY) -m kvmnumad.demo

lint: deps
	$(VENV)/bin/ruff check kvmnumad tests bench
	$(VENV)/bin/mypy kvmnumad bench tests  # strict everywhere: pyproject.toml's [tool.mypy]

# The systemd guest boots beside the host suite and bench-quick, the numa guests after them, one at a time
# (tests/suite.py says why); every part runs, and the closing line "N passed, N failed" counts them all.
test: deps lint
	$(VPY) -m tests.suite

test-host: deps
	$(VPY) -m pytest -m "not numa" tests

# The bus API fuzzed with hypothesis against a real daemon (tests/test_fuzz.py): test-host runs
# 400 examples (over 2,000 calls); this runs 3,000 (over 20,000 calls) and prints the count.
fuzz: deps
	KVMNUMAD_FUZZ_EXAMPLES=3000 $(VPY) -m pytest -q tests/test_fuzz.py

# One guest boot per topology; both run even when the first fails, one summary at the end.
test-numa: deps
	$(VPY) -m tests.numa_guest --topology 2node,4node,memonly --keep-going

# The hotplug storm of issue 12 alone, its 200 cycles on 2 and 4 nodes (make test runs 30): STORM_CYCLES=1000 for more.
STORM_CYCLES ?= 200
test-numa-storm: deps
	$(VPY) -m tests.numa_guest --topology 2node,4node --keep-going -- -k hotplug_storm --storm-cycles $(STORM_CYCLES)

test-numa-2: deps
	$(VPY) -m tests.numa_guest --topology 2node

test-numa-4: deps
	$(VPY) -m tests.numa_guest --topology 4node

test-numa-memonly: deps
	$(VPY) -m tests.numa_guest --topology memonly

# systemd as PID 1 in a guest: the .deb installed with dpkg -i, started, restarted, watchdog-killed,
# stopped and D-Bus activated there (~3-4 min; its root image is cached in /var/cache/kvmnumad-tests).
.PHONY: test-systemd
test-systemd: deps
	$(VPY) -m tests.systemd_guest

# The freeze acceptance: 20 guest runs in a row beside two `stress-ng --cpu 1`, topologies rotated
# (tests/numa_guest/soak.py); not part of `make test`: it takes about an hour.
SOAK_APT_PACKAGES := stress-ng
.PHONY: test-numa-soak

test-numa-soak: deps
	$(call apt_install,$(SOAK_APT_PACKAGES))
	$(VPY) -m tests.numa_guest.soak --runs 20 --load 2

# Debian packages only the full benchmark needs (numad, the peer of the hotplug and placement figures);
# installed by `make bench`, not by `make test` (bench-quick runs host-only figures without them).
BENCH_APT_PACKAGES := numad

bench-deps:
	$(call apt_install,$(BENCH_APT_PACKAGES))

# All figures, the 4-node guest ones included (one guest boot); writes bench/results.md.
bench: deps bench-deps
	$(VPY) -m bench

# Host-only figures with few runs (~25 s), no thresholds: run by `make test` so the benchmarks cannot rot.
bench-quick: deps
	$(VPY) -m bench --quick

deb: deps
	packaging/build-deb.sh dist

rpm: deps
	packaging/build-rpm.sh dist

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
