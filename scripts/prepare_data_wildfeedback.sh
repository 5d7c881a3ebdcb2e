#!/usr/bin/env bash
# WildFeedback interaction tuples (microsoft/WildFeedback) → $OUT_DIR/wildfeedback_interactions.jsonl
# Thin wrapper around auxiliary/preprocess_wildfeedback.py (see its --help for every flag and filter).
#
#   ./scripts/prepare_data_wildfeedback.sh
#   OUT_DIR=/tmp/wildfeedback DATASET_PATH=/path/to/copy ./scripts/prepare_data_wildfeedback.sh
#   ./scripts/prepare_data_wildfeedback.sh --dry-run --length_unit tokens --tokenizer smollm2-135m-instruct
#
# Env: OUT_DIR      output folder (default: <repo>/data/wildfeedback)
#      DATASET_PATH local copy: a file (wildfeedback.json, .parquet, .jsonl) or a folder (Hub snapshot, save_to_disk); empty = download from the Hub
#      BASE_WORK / CACHE_DIR  Hugging Face caches (scripts/common.sh)
# --dry-run (anywhere) prints the resolved command; every other argument goes to the Python script.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

OUT_DIR="${OUT_DIR:-$REPO_ROOT/data/wildfeedback}"
cmd=("$PYTHON" auxiliary/preprocess_wildfeedback.py --out_dir "$OUT_DIR")
if [[ -n "${DATASET_PATH:-}" ]]; then
  cmd+=(--dataset_path "$DATASET_PATH")
fi
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
