#!/usr/bin/env bash
# The Elixir part of `make test` again, on Elixir 1.18.4 beside Debian's 1.14 (issue 15):
# the 1.18 formatter, the 1.18 compiler (which type-checks) with warnings as errors, and
# the ExUnit suite, its test files compiled with warnings as errors too. It has a build
# root of its own (_build/elixir-1.18/test), so the 1.14 build is left alone. Cargo is
# shared: the NIF and the guests do not depend on the Elixir version, so the :capsid
# compiler's cargo run is a no-op after the 1.14 step.
#
# Elixir 1.18.4 is built once (~40 s) and cached by ../shared/toolchains/elixir-1.18;
# CAPSID_SHARED names another shared/ directory (default: ../shared beside the repo).
set -euo pipefail
cd "$(dirname "$0")/.."

shared="${CAPSID_SHARED:-../shared}"
toolchain="$shared/toolchains/elixir-1.18"
if [ ! -x "$toolchain" ]; then
  echo "$toolchain not found: set CAPSID_SHARED to the shared/ directory" >&2
  exit 1
fi

trap 'echo "==> Elixir 1.18 part: ${SECONDS} s"' EXIT
bin="$("$toolchain")"
export PATH="$bin:$PATH" MIX_ENV=test MIX_BUILD_ROOT=_build/elixir-1.18
echo "==> Elixir part of the suite on $(elixir --version | tail -n 1)"

mix format --check-formatted
mix compile --warnings-as-errors --force
# Without :stress (test_helper.exs): that test measures the NIF's memory over
# 10,000 recycles, which does not depend on the Elixir version, and costs ~10 s.
mix test --warnings-as-errors
