#!/usr/bin/env bash
# Installs the Debian packages baton's demo and tests use, when missing.
# Idempotent: a second run installs nothing. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 iptables nftables tcpdump iputils-ping redis-tools redis-server keepalived procps protobuf-compiler fonts-dejavu-core python3 python3-venv)
# Node.js for the ioredis client test: the machine's own when it has one
# (20 or newer), Debian's otherwise.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  packages+=(nodejs npm)
fi

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
# keepalived's and redis-server's packages start services; the benchmarks
# and tests run their own instances inside lab hosts only.
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now keepalived >/dev/null 2>&1 || true
  systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

# Client libraries for the kv tests, at the versions pinned in
# tests/clients: Python redis in a venv under target/, ioredis in
# tests/clients/node_modules (both git-ignored).
venv=target/client-venv
want_py=$(sed -n 's/^redis==//p' tests/clients/requirements.txt)
if ! "$venv/bin/python" -c "import redis, sys; sys.exit(redis.__version__ != '$want_py')" 2>/dev/null; then
  echo "setup: installing Python redis $want_py into $venv"
  rm -rf "$venv"
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/clients/requirements.txt
fi
want_js=$(sed -n 's/.*"ioredis": "\(.*\)".*/\1/p' tests/clients/package.json)
have_js=$(sed -n 's/^  "version": "\(.*\)",$/\1/p' tests/clients/node_modules/ioredis/package.json 2>/dev/null || true)
if [ "$have_js" != "$want_js" ]; then
  echo "setup: installing ioredis $want_js into tests/clients/node_modules"
  (cd tests/clients && npm ci --silent --no-audit --no-fund)
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install a Rust toolchain (1.85 or newer) first" >&2
  exit 1
fi
