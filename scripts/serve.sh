#!/usr/bin/env bash
# Sets up the environment and serves models.toml (or $GATEWAY_CONFIG) on 127.0.0.1:8080 (arguments go to `gateway serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gateway serve --config "${GATEWAY_CONFIG:-models.toml}" "$@"
