#!/usr/bin/env bash
# GPU acceptance check (docs/gpu-check.md): runs scripts/gpu_check.py with the repo's .venv if there is one.
#   scripts/gpu_check.sh [--quick] [--skip build,parity,refit,tests,bench] [--json gpu-check.json] [--keep]
# Env: PYTHON (default .venv/bin/python, else python3). Exit status: 0 all passed, 1 a phase failed, 2 no GPU.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$here/gpu_check.py" "$@"
