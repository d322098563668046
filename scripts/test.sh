#!/usr/bin/env bash
# The test command of the README: installs what the tests need, then runs
# every test of the workspace (unit, property and lab tests) as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --release --no-fail-fast "$@"
