#!/usr/bin/env bash
# Build one recipe for one TensorRT flavour, check the artifact, and publish it when asked.
# Used by .github/workflows/engines.yml; runs the same on a workstation.
#
#   scripts/ci-build.sh --recipe recipes/tiny-flux.yaml --backend tensorrt-rtx --archs sm_89,sm_120 [--smoke]
#   scripts/ci-build.sh --recipe recipes/tiny-flux.yaml --backend tensorrt --archs sm_90 --publish s3://bucket/engines
#
# Options: --out DIR (default engines), --publish URL (dtc publish after the checks), --smoke (a 2-step run).
# tensorrt-rtx builds any arch on a CPU machine; tensorrt builds only for the GPU present, so --archs must be
# exactly this machine's arch (checked before anything is built). Env: DTC (default dtc), PYTHON (default python).
set -euo pipefail

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}
die() {
  echo "ci-build.sh: $*" >&2
  exit 2
}

recipe="" backend="" archs="" out="engines" publish="" smoke=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --recipe) recipe="${2:?--recipe needs a value}"; shift 2 ;;
    --backend) backend="${2:?--backend needs a value}"; shift 2 ;;
    --archs) archs="${2:?--archs needs a value}"; shift 2 ;;
    --out) out="${2:?--out needs a value}"; shift 2 ;;
    --publish) publish="${2:?--publish needs a value}"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    -h | --help) usage 0 ;;
    *) echo "ci-build.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
[[ -n "$recipe" && -n "$backend" && -n "$archs" ]] || die "--recipe, --backend and --archs are required (see --help)"
case "$backend" in
  tensorrt-rtx | tensorrt) ;;
  *) die "--backend must be tensorrt-rtx or tensorrt, not '$backend'" ;;
esac
[[ "$archs" =~ ^sm_[0-9]+(,sm_[0-9]+)*$ ]] || die "--archs must look like sm_89,sm_120, not '$archs'"

DTC=${DTC:-dtc}
PY=${PYTHON:-python}

name=$("$PY" -c 'import sys; from dtcompile.recipe import load_recipe; print(load_recipe(sys.argv[1]).name)' "$recipe")
artifact="$out/$name"

if [[ "$backend" == tensorrt ]]; then
  gpu=$("$PY" -c 'from dtcompile.backends.tensorrt import gpu_arch; print(gpu_arch() or "")')
  [[ "$archs" == "$gpu" ]] || {
    echo "ci-build.sh: this runner's GPU is '${gpu:-none}' but the job asks for '$archs'; check the runner's labels" >&2
    exit 1
  }
fi

sets=(--set "engine.backends=[onnxruntime, $backend]" --set "engine.targets=[${archs//,/, }]" --set "output.dir=$out")

# Fail before loading any weights when a target cannot be built on this runner.
plan=$("$DTC" build --recipe "$recipe" "${sets[@]}" --dry-run)
echo "$plan"
if grep -q "will NOT build" <<<"$plan"; then
  echo "ci-build.sh: this runner cannot build every target (see above)" >&2
  exit 1
fi

"$DTC" build --recipe "$recipe" "${sets[@]}"
"$DTC" inspect "$artifact" --verify

# A target skipped during the build is a CI failure, not a note in the manifest.
"$PY" - "$artifact" <<'PYEOF'
import json
import sys
from pathlib import Path

manifest = json.loads((Path(sys.argv[1]) / "manifest.json").read_text())
for s in manifest.get("skipped", []):
    print(f"ci-build.sh: NOT BUILT {s['backend']} {s['arch']}: {s['reason']}", file=sys.stderr)
sys.exit(1 if manifest.get("skipped") else 0)
PYEOF

if [[ "$smoke" == 1 ]]; then
  "$DTC" run "$artifact" --prompt "ci smoke test" --steps 2 --backend onnxruntime --out "$out/$name-onnxruntime.png"
  if [[ "$backend" == tensorrt ]]; then # the engine itself runs only on its GPU
    "$DTC" run "$artifact" --prompt "ci smoke test" --steps 2 --backend tensorrt --out "$out/$name-tensorrt.png"
  fi
fi

if [[ -n "$publish" ]]; then
  "$DTC" publish "$artifact" --to "$publish"
fi
