# CountApp: `make tests` is what CI runs (through .ci/run).

# rustup installs into ~/.cargo/bin, which a shell started before the install lacks on PATH;
# appended, so that a cargo already on PATH wins.
export PATH := $(PATH):$(HOME)/.cargo/bin

.PHONY: build run tests bench bench-scale bench-store clean reset toolchain

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

# The load tool against freshly started clusters, with Redis, Valkey and HAProxy in the same run; see
# xtask/src/bench.rs for what it measures, and its knobs (BENCH_ROUNDS, BENCH_DURATION,
# BENCH_LISTING_TENANTS, BENCH_READS_ONLY).
bench: build
	./scripts/ensure-packages.sh redis-server:redis-server redis-cli:redis-server haproxy:haproxy
	VALKEY_SERVER=$$(./scripts/ensure-valkey.sh) ./target/release/xtask bench

# Scale: the workers' memory per stored id, sustained load for up to 3 minutes, and 100k and 1M
# tenants, each against a fresh cluster; see xtask/src/scale.rs for the knobs (SCENARIOS,
# WORKER_PERSIST, ...).
bench-scale: build
	./target/release/xtask bench-scale

# The store's criterion benchmarks: ingest and flush, flush against tenant size, flushes into
# Redis (redis-server, valkey-server, a Redis Cluster), open.
bench-store: toolchain
	./scripts/ensure-packages.sh redis-server:redis-server redis-cli:redis-server
	VALKEY_SERVER=$$(./scripts/ensure-valkey.sh) cargo bench -p countapp-store

# The build's output (target/). The cluster's data stays: that is `make reset`.
clean: toolchain
	cargo clean

# A fresh start: the database and the workers' log files of ./config.yaml removed, refused
# while the coordinator or any of its workers runs (coordinator --reset).
reset: toolchain
	cargo run --release --quiet --bin coordinator -- --reset --config config.yaml

# Before anything is built: cargo must be there, and rustc at least the rust-version that
# Cargo.toml declares, or the build would stop later on some feature with an error that does not
# say the toolchain is what is old.
toolchain:
	@command -v cargo >/dev/null 2>&1 || { \
		echo "cargo was not found: install the Rust toolchain from https://rustup.rs (or your package manager) and try again." >&2; \
		exit 1; \
	}
	@need=$$(sed -n 's/^rust-version[[:space:]]*=[[:space:]]*"\([0-9.]*\)".*/\1/p' Cargo.toml | head -n 1); \
	have=$$(rustc --version 2>/dev/null | sed -n 's/^rustc \([0-9][0-9]*\.[0-9][0-9]*\(\.[0-9][0-9]*\)\{0,1\}\).*/\1/p'); \
	if [ -z "$$have" ]; then \
		echo "error: cannot tell the version of rustc ('rustc --version' said: $$(rustc --version 2>&1 | head -n 1)); CountApp needs Rust $$need or newer." >&2; \
		exit 1; \
	fi; \
	if ! awk -v need="$$need" -v have="$$have" 'BEGIN { \
		split(need, n, "."); split(have, h, "."); \
		for (i = 1; i <= 3; i++) { if (h[i] + 0 > n[i] + 0) exit 0; if (h[i] + 0 < n[i] + 0) exit 1 } \
		exit 0 }'; then \
		echo "error: Rust $$have is too old: CountApp needs Rust $$need or newer (rust-version in Cargo.toml)." >&2; \
		echo "       Update it with 'rustup update stable' (or your package manager), then run make again." >&2; \
		exit 1; \
	fi
