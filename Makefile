# Vigil: the two commands a user needs are `make run` and `make test`.
# `make setup` installs what a fresh Debian machine lacks (apt-get only).

CARGO ?= cargo
# The in-guest tools: a separate no_std crate outside the workspace.
TOOLS := --manifest-path guest-tools/Cargo.toml
VIGIL := target/release/vigil
GUEST := guest-images/out

.PHONY: all setup build guest-image run test test-unit bench demo fmt clippy clean

all: build

setup:
	scripts/setup.sh

build:
	$(CARGO) build --release --bin vigil

# Kernel and initramfs, cached in ~/.cache/vigil keyed by their inputs.
guest-image: setup
	guest-images/build.sh all

# Boots the default guest with its console on this terminal; `poweroff` in the
# guest ends it with status 0.
run: guest-image build
	$(VIGIL) run --config guest-images/default-vm.toml

# Unit tests, then end-to-end tests with real guests under /dev/kvm.
test: guest-image
	$(CARGO) test --release $(TOOLS)
	$(CARGO) test --release --workspace --no-fail-fast

test-unit:
	$(CARGO) test --release $(TOOLS) --lib
	$(CARGO) test --release --workspace --lib --bins

bench: guest-image build
	bench/run.sh

fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt $(TOOLS)

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy $(TOOLS) --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf guest-images/out
