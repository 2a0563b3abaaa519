#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine: installs what the tests need when it is
# missing (as root, from Debian's packages), then checks formatting and lints and runs every test.
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run for real (binary name -> package): Redis for the Redis tier, nginx
# and Caddy for gateway tests, Prometheus/promtool for metrics, luac5.1 to syntax-check the Kong
# plugin. A binary still missing after this step makes its tests fail with a clear message.
declare -A packages=(
    [redis-server]=redis-server [redis-cli]=redis-tools
    [nginx]=nginx [caddy]=caddy
    [prometheus]=prometheus [promtool]=prometheus
    [luac5.1]=lua5.1 [curl]=curl
)
missing=()
for binary in "${!packages[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || missing+=("${packages[$binary]}")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        echo "installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "missing packages (run as root to install them): ${missing[*]}" >&2
    fi
fi

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked "$@"
