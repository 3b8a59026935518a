# Read-only checks and the mutating fix-up, for day-to-day work.
.PHONY: check fix test bench

check:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fix:
	cargo fmt --all
	cargo clippy --workspace --all-targets --fix --allow-dirty --allow-staged -- -D warnings

test:
	./scripts/test.sh

bench:
	cargo bench --bench store
