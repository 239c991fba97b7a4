# CountApp: `make tests` is what CI runs (through .ci/run).

# rustup installs into ~/.cargo/bin, which a shell started before the install lacks on PATH;
# appended, so that a cargo already on PATH wins.
export PATH := $(PATH):$(HOME)/.cargo/bin

.PHONY: build run tests bench bench-scale bench-store clean toolchain

build: toolchain
	cargo build --release --workspace

# The coordinator in the foreground with ./config.yaml; it spawns the workers beside it in
# target/release. Ctrl-C stops it and every worker cleanly. First it says where to look: the
# dashboard on the config's listen address, as the coordinator reads the file.
run: build
	./target/release/xtask dashboard --config config.yaml
	./target/release/coordinator --config config.yaml

tests: toolchain
	./scripts/tests.sh

# The load tool against freshly started clusters, with Redis and HAProxy in the same run; see
# xtask/src/bench.rs for what it measures, and its knobs (BENCH_ROUNDS, BENCH_DURATION).
bench: build
	./scripts/ensure-packages.sh redis-server:redis-server redis-cli:redis-server haproxy:haproxy
	./target/release/xtask bench

# Scale: the workers' memory per stored id, sustained load for up to 3 minutes, and 100k and 1M
# tenants, each against a fresh cluster; see xtask/src/scale.rs for the knobs (SCENARIOS,
# WORKER_PERSIST, ...).
bench-scale: build
	./target/release/xtask bench-scale

# The store's criterion benchmarks: ingest and flush, flush against tenant size, open.
bench-store: toolchain
	cargo bench -p countapp-worker

clean: toolchain
	cargo clean

toolchain:
	@command -v cargo >/dev/null 2>&1 || { \
		echo "cargo was not found: install the Rust toolchain from https://rustup.rs (or your package manager) and try again." >&2; \
		exit 1; \
	}
