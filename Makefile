# graft — build, test, demo and benchmark entry points.
#
# `make demo` and `make test` work on a fresh Debian machine as root: they
# install the packages they need (apt), build, and run.

CARGO   ?= cargo
PREFIX  ?= /usr/local
PROFILE ?= debug
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
# Where CNI plugins live on a node (kubelet/containerd's default).
CNI_BIN_DIR ?= /opt/cni/bin

# Debian packages the build, the tests, the demo and the benchmarks use.
DEB_PACKAGES := build-essential pkg-config iproute2 nftables procps psmisc \
	iperf3 nginx-light curl socat python3 netcat-openbsd \
	clang llvm libbpf-dev bpftool \
	wrk debootstrap gnuplot-nox jq python3-yaml containernetworking-plugins \
	golang-go musl-tools busybox-static

.PHONY: all deps build release test lint demo docker-image bench bench-quick install uninstall \
	install-ip-divert uninstall-ip-divert clean

all: build

# Installs only what is missing, so repeated runs cost nothing.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "deps: installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "deps: all packages present"; fi
	@command -v $(CARGO) >/dev/null || { echo "deps: cargo not found: install Rust (rustup) first"; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy

# The `graft` launcher ships statically linked, so it runs in any image
# (scratch, distroless, Alpine). cargo cannot set crt-static for one binary
# of a workspace (it would also hit the preload cdylib and the proc macros),
# so it is built on its own into target/static; the tests use
# target/debug/graft-static (they build it themselves when missing).
STATIC_GRAFT = $(CARGO) rustc -p graft-launcher --bin graft --target-dir target/static

build: deps
	$(CARGO) build --workspace --all-targets
	$(STATIC_GRAFT) -- -C target-feature=+crt-static
	cp target/static/debug/graft target/debug/graft-static

release: deps
	$(CARGO) build --workspace --release
	$(STATIC_GRAFT) --release -- -C target-feature=+crt-static

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The test command of the README and of CI: lint, unit tests, end-to-end tests
# (real programs in real namespaces; they need root), and the benchmark
# harness's smoke run (one quick cell per path).
test: build lint
	$(CARGO) test --workspace --no-fail-fast
	bench/run --smoke

demo: build
	scripts/demo

# The graft-demo image from release binaries (the tests build their own tag
# from debug binaries); skipped with one line when no Docker engine answers.
docker-image: release
	@if docker info >/dev/null 2>&1; then \
		GRAFT_DEMO_IMAGE=graft-demo:latest docker/demo/build-image.sh target/release; \
	else echo "docker-image: no Docker engine answers; the Docker rows will be skipped"; fi

bench: release docker-image
	GB_DEMO_IMAGE=graft-demo:latest bench/run --full

bench-quick: release docker-image
	GB_DEMO_IMAGE=graft-demo:latest bench/run --quick

install: release
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/graft
	install -m 0755 target/release/graftd target/release/ip-graft \
		target/release/docker-ns-exec $(DESTDIR)$(PREFIX)/bin/
	install -m 0755 target/static/release/graft $(DESTDIR)$(PREFIX)/bin/graft
	install -m 0755 iproute-graft/ip $(DESTDIR)$(PREFIX)/bin/ip
	install -m 0644 target/release/libgraft_convert.so $(DESTDIR)$(PREFIX)/lib/graft/libgraft-convert.so
	install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	sed 's|@BINDIR@|$(PREFIX)/bin|g' deploy/systemd/graftd.service.in > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/graftd.service
	chmod 0644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/graftd.service
	@echo "install: systemctl daemon-reload && systemctl enable --now graftd (see README, 'graftd as a service')"
	install -d $(DESTDIR)$(CNI_BIN_DIR)
	install -m 0755 target/release/graft-cni $(DESTDIR)$(CNI_BIN_DIR)/graft-cni

uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/bin/,graftd ip-graft graft docker-ns-exec ip)
	rm -rf $(DESTDIR)$(PREFIX)/lib/graft
	rm -f $(DESTDIR)$(SYSTEMD_UNIT_DIR)/graftd.service
	rm -f $(DESTDIR)$(CNI_BIN_DIR)/graft-cni

# Opt-in (Debian/Ubuntu): the literal `/sbin/ip graft ...` of AF_GRAFT's
# walkthrough. Diverts iproute2's /sbin/ip with dpkg-divert and installs the
# wrapper there; every other `ip` command still runs iproute2's.
install-ip-divert: install
	iproute-graft/divert-ip install iproute-graft/ip

uninstall-ip-divert:
	iproute-graft/divert-ip remove

clean:
	$(CARGO) clean
