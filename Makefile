# CountApp: `make tests` is what CI runs (through .ci/run).

# rustup installs into ~/.cargo/bin, which a shell started before the install lacks on PATH;
# appended, so that a cargo already on PATH wins.
export PATH := $(PATH):$(HOME)/.cargo/bin

.PHONY: build run tests bench clean toolchain

build: toolchain
	cargo build --release --workspace

# The coordinator, which spawns the workers, is not written yet; failing loudly beats
# pretending to run something.
run: build
	@echo "make run: nothing to run yet; it will start the coordinator with ./config.yaml once the coordinator binary exists." >&2
	@exit 1

tests: toolchain
	./scripts/test-summary.sh --workspace --no-fail-fast

bench: toolchain
	cargo bench -p countapp-worker

clean: toolchain
	cargo clean

toolchain:
	@command -v cargo >/dev/null 2>&1 || { \
		echo "cargo was not found: install the Rust toolchain from https://rustup.rs (or your package manager) and try again." >&2; \
		exit 1; \
	}
