#!/usr/bin/env bash
# docs/serving.md figures: the same load against --max-batch 1 and --max-batch 2, one after the other.
# Needs engines/tiny-flux (make demo); writes engines/serve-load-b{1,2}.json and the server logs beside them.
set -euo pipefail
for b in 1 2; do
  .venv/bin/dtc serve engines/tiny-flux --port 8124 --max-batch $b --max-queue 64 > engines/serve-b$b.log 2>&1 &
  pid=$!
  for i in $(seq 60); do curl -sf localhost:8124/ready >/dev/null && break; sleep 1; done
  .venv/bin/python scripts/serve_load.py --url http://127.0.0.1:8124 --model tiny-flux --clients 8 --seconds 60 --steps 4 --size 64x64 --json engines/serve-load-b$b.json > /dev/null
  kill -TERM $pid; wait $pid
done
