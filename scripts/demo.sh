#!/usr/bin/env bash
# Set up (or refresh) .venv, then run the main job's embedded default. Extra args go to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python jobs/opd.py "$@"
