# rawmount — `make demo` runs the main job on a built-in sample; `make test` runs the tests.
# Both install what they need on a fresh Debian machine (as root) first.

SWIFT ?= swift
DEBUG_BIN := .build/debug/rawmount
RELEASE_BIN := .build/release/rawmount
APT_PACKAGES := libfuse3-dev fuse3 pkg-config bash-completion zlib1g-dev libdeflate-dev libzstd-dev libisal-dev qemu-utils qemu-system-common fio e2fsprogs util-linux fdisk sleuthkit bximage python3 libvmdk-utils libqcow-utils libnbd-bin man-db nbdkit nbdkit-plugin-dev iproute2 ewf-tools xmount python3-libnbd

# `make install [PREFIX=/usr/local] [DESTDIR=] [BIN=path]`: the binary (release build unless
# BIN names one) where mount(8)'s helpers find it (mount.fuse3 runs it with the shell's
# default PATH, which has /usr/local/bin and /usr/bin), rawmount(1), and completions.
PREFIX ?= /usr/local
DESTDIR ?=
BIN ?=
INSTALL_BIN := $(if $(BIN),$(BIN),$(RELEASE_BIN))
BINDIR := $(DESTDIR)$(PREFIX)/bin
LIBDIR := $(DESTDIR)$(PREFIX)/lib/rawmount
MANDIR := $(DESTDIR)$(PREFIX)/share/man/man1
BASHDIR := $(DESTDIR)$(PREFIX)/share/bash-completion/completions
ZSHDIR := $(DESTDIR)$(PREFIX)/share/zsh/site-functions
FISHDIR := $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d

.PHONY: all deps build release test demo bench crash clean man man-tool install uninstall deb

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

# swift-argument-parser's manual writer. Built with the tests, so that a test can run
# `make install` while `swift test` holds the build directory.
man-tool: deps
	@[ -x .build/debug/generate-manual ] || $(SWIFT) build --product generate-manual

# Swift's standard library and Foundation are linked in, so the binary and the plugin run
# on a machine without the Swift toolchain (only Debian's own libraries are loaded).
release: deps
	$(SWIFT) build -c release --static-swift-stdlib

test: build man-tool release
	$(SWIFT) test

demo: release
	RAWMOUNT=$(RELEASE_BIN) bash scripts/demo.sh

bench: release
	RAWMOUNT=$(RELEASE_BIN) python3 scripts/bench.py
	RAWMOUNT=$(RELEASE_BIN) python3 scripts/hashbench.py
	RAWMOUNT=$(RELEASE_BIN) python3 scripts/convertbench.py
	RAWMOUNT=$(RELEASE_BIN) python3 scripts/nbdbench.py
	RAWMOUNT=$(RELEASE_BIN) /usr/bin/python3 scripts/backupbench.py
	RAWMOUNT=$(RELEASE_BIN) python3 scripts/scale.py

# kill -9 campaigns (CRASH_ROUNDS per format, default 20), then host fault campaigns (the Nth
# write, fdatasync or fallocate fails; FAULT_ROUNDS fault points per format, default 40);
# prints both tables.
crash: build
	RAWMOUNT=$(DEBUG_BIN) python3 scripts/crash.py --rounds $${CRASH_ROUNDS:-20}
	RAWMOUNT=$(DEBUG_BIN) python3 scripts/faults.py --rounds $${FAULT_ROUNDS:-40}

# `make deb [BIN=path] [OUT=dir]`: a Debian package of what `make install` installs under /usr,
# its Depends worked out from the libraries the binary and the plugin load.
deb: man
	BIN=$(INSTALL_BIN) OUT=$(if $(OUT),$(OUT),.build) sh scripts/deb.sh

# The manual is generated from the argument parser's own description of every verb and option.
man: $(if $(BIN),deps,release) man-tool
	mkdir -p .build/man
	.build/debug/generate-manual $(INSTALL_BIN) --output-directory .build/man --authors "the rawmount developers"

install: man
	install -D -m 0755 $(INSTALL_BIN) $(BINDIR)/rawmount
	install -D -m 0644 $(dir $(INSTALL_BIN))librawmount-nbdkit.so $(LIBDIR)/librawmount-nbdkit.so
	@# SwiftPM links a shared library against the toolchain's runtime even with --static-swift-stdlib:
	@# the runtime libraries the plugin loads go beside it (its RUNPATH has $$ORIGIN).
	@rm -f $(LIBDIR)/.runtime; for lib in $$(ldd $(dir $(INSTALL_BIN))librawmount-nbdkit.so | awk '/=>/ {print $$3}' | grep -v '^/lib/\|^/usr/lib/'); do \
	  install -m 0644 $$lib $(LIBDIR)/; echo "$$(basename $$lib)" >> $(LIBDIR)/.runtime; done
	install -D -m 0644 .build/man/rawmount.1 $(MANDIR)/rawmount.1
	mkdir -p $(BASHDIR) $(ZSHDIR) $(FISHDIR)
	$(INSTALL_BIN) --generate-completion-script bash > $(BASHDIR)/rawmount
	$(INSTALL_BIN) --generate-completion-script zsh > $(ZSHDIR)/_rawmount
	$(INSTALL_BIN) --generate-completion-script fish > $(FISHDIR)/rawmount.fish
	@echo "installed $(BINDIR)/rawmount, the nbdkit plugin $(LIBDIR)/librawmount-nbdkit.so, $(MANDIR)/rawmount.1 and bash/zsh/fish completions"

uninstall:
	rm -f $(BINDIR)/rawmount $(LIBDIR)/librawmount-nbdkit.so $(MANDIR)/rawmount.1 $(BASHDIR)/rawmount $(ZSHDIR)/_rawmount $(FISHDIR)/rawmount.fish
	-[ -f $(LIBDIR)/.runtime ] && for lib in $$(cat $(LIBDIR)/.runtime); do rm -f $(LIBDIR)/$$lib; done; rm -f $(LIBDIR)/.runtime
	-rmdir $(LIBDIR) 2>/dev/null

clean:
	rm -rf .build
