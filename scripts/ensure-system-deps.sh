#!/usr/bin/env bash
# Debian packages the Python wheels need at run time: libibverbs1 for Mooncake's transfer engine.
set -euo pipefail
missing=()
for pkg in libibverbs1; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "warning: missing Debian packages ${missing[*]} (install them as root); Mooncake transfers will be unavailable" >&2
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
