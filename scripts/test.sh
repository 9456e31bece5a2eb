#!/usr/bin/env bash
# Installs cadenza with its test dependencies and runs the whole suite, real-systemd tests
# included. Fails if any real-systemd test was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
export CADENZA_REQUIRE_SYSTEMD=1
# The suite's soak: 100 upgrades (about a minute); tests/soak.py and tests/reliability_report.py run 500.
export CADENZA_SOAK_UPGRADES="${CADENZA_SOAK_UPGRADES:-100}"
skips=$(mktemp)
trap 'rm -f "$skips"' EXIT
export CADENZA_SYSTEMD_SKIPS_FILE="$skips"
.venv/bin/python -m pytest "$@"
if [ "$(cat "$skips")" != "0" ]; then
    echo "FAILED: $(cat "$skips") real-systemd test(s) were skipped; they must run" >&2
    exit 1
fi
