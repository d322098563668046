#!/usr/bin/env bash
# The test command of the README: installs what the tests need, then runs
# every test of the workspace (unit, property and lab tests) as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One test at a time: the lab tests move live streams at full speed on a
# 2-core machine, and two of them side by side have stalled (see notes).
cargo test --workspace --release --no-fail-fast "$@" -- --test-threads=1
