# pytest-hil. `make demo` and `make test` set up everything they need on a fresh Debian 12 machine
# (apt packages, a venv), then run.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
# QEMU boards, the reference OS builder, flashing, emulated bench hardware, libvirt, the lab
# database (PostgreSQL; its tests start a throwaway server), chromium (headless: renders the
# --hil-report page in its test).
APT_PACKAGES := qemu-system-arm qemu-system-x86 qemu-utils u-boot-qemu u-boot-tools \
  busybox-static chrony dropbear-bin mtools dosfstools e2fsprogs fdisk grub-pc-bin grub-common \
  bmap-tools ser2net socat zstd xz-utils jq cpio kmod udev openssh-client iproute2 openvpn \
  binutils-aarch64-linux-gnu libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
  libvirt-dev libsystemd-dev libhidapi-hidraw0 pkg-config gcc python3-dev \
  postgresql libpq5 nbdkit docker-registry skopeo chromium
STAMP := $(VENV)/.installed
RIG ?= qemu-aarch64
SUITES ?= suites
HILTEST := $(PYTEST) -p no:cacheprovider -q -ra

.PHONY: deps apt venv demo test test-framework test-boards test-broken lint docs bench clean

deps: apt venv

# The reference OS is built from Debian arm64 packages fetched with apt-get download.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	arm64=$$(dpkg --print-foreign-architectures | grep -qx arm64 || echo no); \
	if [ -n "$$missing$$arm64" ]; then \
	  echo "apt: installing$${missing:+ $$missing}$${arm64:+ (and the arm64 package lists)}"; \
	  $(SUDO) dpkg --add-architecture arm64 && \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
	    $(APT_PACKAGES); \
	fi

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev,hw,allure,bench,docs]'
	touch $@

# The main job: the suites on the default QEMU rig with the reference OS image.
demo: deps
	$(PYTEST) -p no:cacheprovider --rig=$(RIG) $(SUITES) -v

# mypy strict on the suites too: each suite folder on its own (their conftest.py files share a name)
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	MYPYPATH=suites $(VENV)/bin/mypy --strict suites/*.py
	for d in suites/*/; do MYPYPATH=$$d:suites $(VENV)/bin/mypy --strict $$d*.py || exit 1; done
	$(PY) -m hil.docgen --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site-check

# The documentation as a site in site/ (mkdocs, docs/ and mkdocs.yml); lint builds it --strict.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The framework's own tests (unit + integration on real QEMU boots and emulated bench hardware),
# then every suite on both QEMU boards, and the smoke suite through each emulated bench.
# Three streams at once (make's own jobs): each is mostly one QEMU guest, and each guest spends
# much of its time waiting (NTP bursts, health-check timers, reboots, the deadlines the negative
# runs wait out), so two cores overlap them. Each stream's output is printed whole when it
# ends. Times: docs/benchmarks.md.
test: deps lint
	$(MAKE) --no-print-directory -j3 --output-sync=target test-framework test-boards test-broken

# The x86-64 board's persistence, provisioning and rollback suites run in the framework stream,
# before the framework's tests; its other suites follow the aarch64 board's suites; the negative
# runs (tests/broken: a suite on a broken OS, on a rig of its own each) and the emulated benches'
# smoke runs (each bench rig has ports of its own) are the third stream. So the three take
# about as long (docs/benchmarks.md).
X86_FIRST := suites/persistence suites/provisioning suites/rollback
test-framework:
	$(HILTEST) --durations=10 --rig=qemu-x86_64 $(X86_FIRST)
	$(HILTEST) --durations=25 --ignore=tests/broken tests

test-boards:
	$(HILTEST) --durations=10 --rig=qemu-aarch64 suites
	$(HILTEST) --durations=10 --rig=qemu-x86_64 $(addprefix --ignore=,$(X86_FIRST)) suites

test-broken:
	$(HILTEST) --durations=15 tests/broken
	$(HILTEST) --rig=virtual-rpi3 suites/smoke
	$(HILTEST) --rig=virtual-rpi3-pdu suites/smoke
	$(HILTEST) --rig=libvirt-aarch64 suites/smoke
	$(HILTEST) --rig=virtual-nuc suites/smoke

bench: deps
	$(PY) bench/console_roundtrip.py
	$(PY) bench/flash.py
	$(PY) bench/suites.py
	$(PY) bench/refos_boot.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
