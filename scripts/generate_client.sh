#!/usr/bin/env bash
# Regenerate clients/python from the committed openapi.json (run `make openapi` first when the API
# changed). The generator runs from a throw-away venv so it never enters the service's deps.
set -euo pipefail
cd "$(dirname "$0")/.."
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
python3 -m venv "$gen"
"$gen/bin/pip" install --quiet openapi-python-client==0.29.1 ruff
rm -rf clients/python
PATH="$gen/bin:$PATH" "$gen/bin/openapi-python-client" generate --path openapi.json \
  --output-path clients/python --meta setup
