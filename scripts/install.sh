#!/usr/bin/env bash
# Installs what cadenza needs on Debian 12, as root: apt packages, then a venv in .venv with
# cadenza and (with --test) its test dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

packages=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev systemd util-linux procps curl)
[ -n "$extras" ] && packages+=(wrk dbus openssl nginx nodejs openssh-server haproxy iproute2)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own Python: the venv then works for services under systemd's hardening
# (ProtectHome=) and is what a Debian package would use.
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -U pip 'setuptools>=77' wheel
# pystemd ships no wheel: it compiles against libsystemd-dev (about 20 s).
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
echo "installed: $(.venv/bin/cadenza --version) in $(pwd)/.venv"
