#!/usr/bin/env bash
# Regenerate CALIBRATION.md/.json and figures/calibration_*.png (issue 17). Two worlds, two packages that never import
# each other: the LLM side writes files (steps 1-2), the toy side reads them (step 3). Run from the repository root.
#   studies/calibration/run.sh            # canonical toy scale
#   SCALE=medium studies/calibration/run.sh
set -euo pipefail
SCALE=${SCALE:-canonical}
PY=${PY:-.venv/bin}
# 0. the tiny model (skipped if present)
[ -e outputs/tiny-model ] || "$PY/sdpo-llm" make-tiny --out outputs/tiny-model
# 1. LLM: the self-teacher's feedback credit vs c_t and the MC advantage (committed as studies/calibration/credit_truth.json;
#    ~11 min on the shared 2-core machine). Uncomment to re-measure:
# "$PY/sdpo-llm" credit-truth --recipe tiny-cpu --set training.prompts_per_step=16 --steps 0,10 --out outputs/credit-truth \
#     && cp outputs/credit-truth/credit_truth.json studies/calibration/credit_truth.json
# 2. LLM: the predicted-vs-observed grid, fixed before running (resumable; ~4-12 min on 2 Ray workers)
"$PY/sdpo-llm" grid studies/calibration/grid.yaml --out outputs/calibration/llm-grid --backend ray --workers 2
# 3. toy: calibrate rho per channel on the LLM's measurement, simulate the grid at the calibrated rho, compare
"$PY/sdpo-sim" calibrate --credit-truth studies/calibration/credit_truth.json --llm-grid outputs/calibration/llm-grid \
    --out outputs/calibration/toy --scale "$SCALE" --report CALIBRATION.md --figures figures
