# rawmount — `make demo` runs the main job on a built-in sample; `make test` runs the tests.
# Both install what they need on a fresh Debian machine (as root) first.

SWIFT ?= swift
DEBUG_BIN := .build/debug/rawmount
RELEASE_BIN := .build/release/rawmount
APT_PACKAGES := libfuse3-dev fuse3 pkg-config zlib1g-dev libdeflate-dev libzstd-dev qemu-utils qemu-system-common fio e2fsprogs util-linux fdisk sleuthkit bximage python3 libvmdk-utils libqcow-utils libnbd-bin

.PHONY: all deps build release test demo bench crash clean

all: build

# Installs only what is missing, so repeated runs cost nothing.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "run as root (or install:$$missing)"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

test: build
	$(SWIFT) test

demo: release
	RAWMOUNT=$(RELEASE_BIN) bash scripts/demo.sh

bench: release
	RAWMOUNT=$(RELEASE_BIN) python3 scripts/bench.py
	RAWMOUNT=$(RELEASE_BIN) python3 scripts/hashbench.py
	RAWMOUNT=$(RELEASE_BIN) python3 scripts/scale.py

# kill -9 campaigns (CRASH_ROUNDS per format, default 20); prints the table.
crash: build
	RAWMOUNT=$(DEBUG_BIN) python3 scripts/crash.py --rounds $${CRASH_ROUNDS:-20}

clean:
	rm -rf .build
