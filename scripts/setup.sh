#!/usr/bin/env bash
# Installs the Debian packages baton's demo and tests use, when missing.
# Idempotent: a second run installs nothing. Needs root.
set -euo pipefail

packages=(iproute2 iptables iputils-ping redis-tools keepalived procps protobuf-compiler fonts-dejavu-core)

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (the lab creates network namespaces)" >&2
  exit 1
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# keepalived's package starts a service; the benchmarks run their own
# instances inside lab hosts only.
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now keepalived >/dev/null 2>&1 || true
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install a Rust toolchain (1.85 or newer) first" >&2
  exit 1
fi
