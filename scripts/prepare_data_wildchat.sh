#!/usr/bin/env bash
# WildChat interaction tuples (allenai/WildChat, gated) → $OUT_DIR/wildchat_interactions_v1.jsonl
# Thin wrapper around auxiliary/preprocess_wildchat.py (see its --help for every flag and filter).
#
#   ./scripts/prepare_data_wildchat.sh
#   OUT_DIR=/tmp/wildchat DATASET_PATH=/path/to/copy ./scripts/prepare_data_wildchat.sh
#   ./scripts/prepare_data_wildchat.sh --dry-run --length_unit tokens --tokenizer smollm2-135m-instruct
#
# Env: OUT_DIR      output folder (default: <repo>/data/wildchat)
#      DATASET_PATH local copy: a file (.parquet, .jsonl) or a folder (Hub snapshot with data/train-*.parquet, save_to_disk); empty = download from the Hub
#      BASE_WORK / CACHE_DIR  Hugging Face caches (scripts/common.sh)
# --dry-run (anywhere) prints the resolved command; every other argument goes to the Python script.
# The Hub copy is gated: accept its terms on the Hub and set HF_TOKEN (environment or .env).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

OUT_DIR="${OUT_DIR:-$REPO_ROOT/data/wildchat}"
cmd=("$PYTHON" auxiliary/preprocess_wildchat.py --out_dir "$OUT_DIR")
if [[ -n "${DATASET_PATH:-}" ]]; then
  cmd+=(--dataset_path "$DATASET_PATH")
fi
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
