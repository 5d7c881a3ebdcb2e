#!/usr/bin/env bash
# Per-token SDPO signal heatmaps (auxiliary/sdpo_signal_analysis.py): unrelated vs feedback follow-ups.
#   ./scripts/run_signal_analysis.sh                                   # Qwen3-8B on a GPU, 24 cases
#   MODEL=smollm2-135m-instruct N_CASES=12 ./scripts/run_signal_analysis.sh --max_new_tokens 128 --min_y_tokens 48   # CPU
#   ./scripts/run_signal_analysis.sh --dry-run                         # print the command, run nothing
# Environment (defaults): MODEL (Qwen/Qwen3-8B), CASES_JSON (<repo>/auxiliary/signal_analysis_cases.json),
# N_CASES (24), SEED (123), RUN_ID (signal-analysis-<YYYYmmdd-HHMMSS>), OUT_DIR ($BASE_WORK/signal-analysis/$RUN_ID).
# Extra arguments go to the Python script (e.g. --hindsight_variant offline_v1 --token_case_index 3).
# The Python script creates OUT_DIR after checking it (a file there is reported before the model loads).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

MODEL="${MODEL:-Qwen/Qwen3-8B}"
CASES_JSON="${CASES_JSON:-$REPO_ROOT/auxiliary/signal_analysis_cases.json}"
N_CASES="${N_CASES:-24}"
SEED="${SEED:-123}"
RUN_ID="${RUN_ID:-signal-analysis-$(date +%Y%m%d-%H%M%S)}"
OUT_DIR="${OUT_DIR:-$BASE_WORK/signal-analysis/$RUN_ID}"

echo "signal analysis: model=$MODEL n_cases=$N_CASES seed=$SEED out_dir=$OUT_DIR ($(date))"
sdpo_run "$PYTHON" auxiliary/sdpo_signal_analysis.py \
  --model "$MODEL" \
  --cases_json "$CASES_JSON" \
  --out_dir "$OUT_DIR" \
  --n_cases "$N_CASES" \
  --seed "$SEED" \
  "${SDPO_ARGS[@]}"
