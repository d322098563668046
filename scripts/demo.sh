#!/usr/bin/env bash
# The demo command of the README: installs what it needs, builds baton and
# runs `baton demo` (which builds a lab, runs the demo and removes the lab).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
exec target/release/baton demo "$@"
