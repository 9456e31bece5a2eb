#!/usr/bin/env bash
# Installs cadenza and runs the built-in demo on 127.0.0.1:8000 with 2 workers (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/cadenza run "$@"
