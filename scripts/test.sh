#!/usr/bin/env bash
# Installs cadenza with its test dependencies and runs the whole suite, real-systemd tests
# included. Fails if any real-systemd test was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
export CADENZA_REQUIRE_SYSTEMD=1
exec .venv/bin/python -m pytest "$@"
