#!/usr/bin/env bash
# Rerun everything whose figures depend on the shipped weights, in the order the README uses
# them, after `adadiff train ship` replaced adadiff/weights/tiny. Run on a quiet machine from the
# repository root with the dev and train extras installed:
#
#     bash tools/refresh_figures.sh            # every step (about 75 min on 2 cores)
#     bash tools/refresh_figures.sh quality front   # only the named steps
#
# Steps: quality (whole photos and the gallery), front (the quality/compute front), evaluate
# (MMLE against the oracle), quick (the Performance section), scaling (large photos), load (busy
# machine), scaleout (Ray). Each writes its JSON under benchmarks/reference/ and regenerates the
# README section that quotes it (evaluate has none); after quality or evaluate the model card's
# Evaluation section follows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REF=benchmarks/reference
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(quality front evaluate quick scaling load scaleout)

for step in "${steps[@]}"; do
  echo "== $step ($(date -u +%H:%M:%S))"
  case "$step" in
    quality)  # ~2 min
      "$PY" -m benchmarks.quality --out "$REF/quality-cpu" --threads 2 --readme README.md ;;
    front)  # ~30 min; the DTSS calibration of `adadiff calibrate` and its coarse-tier variant
      # (docs/adaptive.md) run beside the model's own
      cal=()
      for name in calibrated coarse; do
        [ -f "$REF/front-cpu/$name-tiny.json" ] && cal+=(--dtss "$name=$REF/front-cpu/$name-tiny.json")
      done
      "$PY" -m benchmarks.front --out "$REF/front-cpu" --threads 1 "${cal[@]}" --readme README.md ;;
    evaluate)  # ~16 min
      "$PY" -m benchmarks.evaluate_tiny --out "$REF/eval_tiny_cpu.json" --threads 2 ;;
    quick)  # ~7 min
      "$PY" -m benchmarks quick --device cpu --backend torch,onnxruntime --model tiny \
        --threads 2 --out "$REF/cpu-quick"
      "$PY" -m benchmarks report "$REF/cpu-quick/results.json" --readme README.md \
        --memory "$REF/cpu-scaling/results.json" --load "$REF/load-cpu.json" ;;
    scaling)  # ~15 min
      "$PY" -m benchmarks quick --sections scaling --sizes 256,512,1024,2048 \
        --scaling-interval 200 --backend torch --out "$REF/cpu-scaling" ;;
    load)  # ~2 min
      "$PY" -m benchmarks load --repeats 1 --out "$REF/load-cpu.json" ;;
    scaleout)  # ~5 min
      "$PY" -m benchmarks.scaleout --images 24 --model tiny --max-batch 8 --max-workers 2 \
        --repeats 3 --cpus-per-worker 1.0 --gpus-per-worker 0.0 \
        --out "$REF/scaleout_cpu.json" --readme README.md ;;
    *)
      echo "unknown step $step; choose from quality front evaluate quick scaling load scaleout" >&2
      exit 2 ;;
  esac
done
# The model card quotes the quality and evaluate runs: rewrite its Evaluation section from them
# (the weights and the rest of the card stay as shipped).
if [[ " ${steps[*]} " == *" quality "* || " ${steps[*]} " == *" evaluate "* ]]; then
  "${ADADIFF:-.venv/bin/adadiff}" train card adadiff/weights/tiny \
    --eval "$REF/eval_tiny_cpu.json" --quality "$REF/quality-cpu/quality.json"
fi
# The Performance section quotes the scaling and load runs too: render it once more at the end.
"$PY" -m benchmarks report "$REF/cpu-quick/results.json" --readme README.md \
  --memory "$REF/cpu-scaling/results.json" --load "$REF/load-cpu.json"
