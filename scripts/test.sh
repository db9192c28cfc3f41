#!/usr/bin/env bash
# Set up (or refresh) .venv, then run the test suite on CPU. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m pytest -q -x --timeout=900 "$@"
