#!/usr/bin/env bash
# Creates .venv (if missing) and installs the gateway with its test extras. Idempotent: once
# installed for this pyproject.toml, it installs nothing again (a restart needs no package index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.installed-for
WANT=$(.venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$WANT" > "$STAMP"
fi
