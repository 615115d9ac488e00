#!/usr/bin/env bash
# Installs what Capsid needs on a fresh Debian machine with Rust present, and
# does nothing when it is all there already (safe to run every time).
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v elixir >/dev/null 2>&1 || ! command -v erlc >/dev/null 2>&1 \
   || ! dpkg -s erlang-dev >/dev/null 2>&1; then
  echo "==> installing Elixir and Erlang (Debian packages)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq elixir erlang-dev >/dev/null
fi

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "==> adding the wasm32-wasip2 Rust target"
  rustup target add wasm32-wasip2
fi
