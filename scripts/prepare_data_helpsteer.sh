#!/usr/bin/env bash
# HelpSteer2 prompts (nvidia/HelpSteer2) → $OUT_DIR/{train,validation}.jsonl
# Thin wrapper around auxiliary/preprocess_helpsteer.py (see its --help for every flag and filter).
#
#   ./scripts/prepare_data_helpsteer.sh
#   OUT_DIR=/tmp/helpsteer_prompts DATASET_PATH=/path/to/copy ./scripts/prepare_data_helpsteer.sh
#   ./scripts/prepare_data_helpsteer.sh --dry-run --length_unit tokens --tokenizer smollm2-135m-instruct
#
# Env: OUT_DIR      output folder (default: <repo>/data/helpsteer_prompts)
#      DATASET_PATH local copy: a folder (Hub snapshot, save_to_disk, or train.* / validation.* files);
#                   empty = download from the Hub. Per-split files go as arguments instead:
#                   ./scripts/prepare_data_helpsteer.sh --dataset_path train=a.jsonl.gz validation=b.jsonl.gz
#      BASE_WORK / CACHE_DIR  Hugging Face caches (scripts/common.sh)
# --dry-run (anywhere) prints the resolved command; every other argument goes to the Python script.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

OUT_DIR="${OUT_DIR:-$REPO_ROOT/data/helpsteer_prompts}"
cmd=("$PYTHON" auxiliary/preprocess_helpsteer.py --out_dir "$OUT_DIR")
if [[ -n "${DATASET_PATH:-}" ]]; then
  cmd+=(--dataset_path "$DATASET_PATH")
fi
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
