#!/usr/bin/env bash
# TL;DR prompts (openai/summarize_from_feedback, comparisons) → $OUT_DIR/{train,validation}.jsonl + save_to_disk copy
# Thin wrapper around auxiliary/preprocess_tldr_dataset.py (see its --help for every flag and filter).
#
#   ./scripts/prepare_data_tldr.sh
#   OUT_DIR=/tmp/tldr_prompts_unique DATASET_PATH=/path/to/copy ./scripts/prepare_data_tldr.sh
#   ./scripts/prepare_data_tldr.sh --dry-run --length_unit tokens --tokenizer smollm2-135m-instruct
#
# Env: OUT_DIR      output folder (default: <repo>/data/tldr_prompts_unique)
#      DATASET_PATH local copy: a folder (Hub snapshot, save_to_disk, or train.* / validation.* files);
#                   empty = download from the Hub. Per-split files go as arguments instead:
#                   ./scripts/prepare_data_tldr.sh --dataset_path train=a.parquet validation=b.parquet
#      BASE_WORK / CACHE_DIR  Hugging Face caches (scripts/common.sh)
# --dry-run (anywhere) prints the resolved command; every other argument goes to the Python script.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

OUT_DIR="${OUT_DIR:-$REPO_ROOT/data/tldr_prompts_unique}"
cmd=("$PYTHON" auxiliary/preprocess_tldr_dataset.py --out_dir "$OUT_DIR")
if [[ -n "${DATASET_PATH:-}" ]]; then
  cmd+=(--dataset_path "$DATASET_PATH")
fi
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
