# The two commands of README: `make demo` and `make test`. Both install what
# is missing first (scripts/setup.sh) and build everything through mix.
# `make test` ends with the Elixir part of the suite again on Elixir 1.18
# (scripts/test-elixir-1.18.sh; it finds ../shared, or CAPSID_SHARED).
.PHONY: demo test setup bench

setup:
	@bash scripts/setup.sh

demo: setup
	mix run examples/demo.exs

test: setup
	cargo fmt --all --check
	cargo clippy --workspace --release --all-targets -- -D warnings
	cargo clippy --release --target wasm32-wasip2 $(patsubst guest/%/Cargo.toml,-p %,$(wildcard guest/*/Cargo.toml)) -- -D warnings
	cargo test --release --workspace
	MIX_ENV=test mix format --check-formatted
	MIX_ENV=test mix compile --warnings-as-errors --force
	MIX_ENV=test mix test --include stress --include integration
	bash scripts/test-elixir-1.18.sh

# All benchmarks (not part of `make test`: they need a quiet machine).
bench: setup
	bash bench/run.sh
