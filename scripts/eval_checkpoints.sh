#!/usr/bin/env bash
# Evaluate saved checkpoints against a baseline across several judged styles (auxiliary/eval_checkpoints.py).
#
#   CHECKPOINTS="/path/ckpt1 /path/ckpt2" BASELINE_MODEL=Qwen/Qwen3-8B ./scripts/eval_checkpoints.sh   # reference GPU setup
#   CHECKPOINTS="runs/<id>/checkpoints/step_8 runs/<id>/checkpoints/step_16" PRESET=cpu ./scripts/eval_checkpoints.sh
#   ./scripts/eval_checkpoints.sh --dry-run --eval_max_new_tokens 512   # print the command; extra arguments are forwarded
#
# Env (defaults): CHECKPOINTS (required, space-separated folders: full models or LoRA adapters)
#   BASELINE_MODEL (required) | EVAL_STYLES "less_filler_praise_sycophancy no_emojis answer_directly_reduce_formatting"
#   USER_MODEL Qwen/Qwen3-32B (the local judge, on a vLLM engine) | EVAL_N 100 | SEED 424242 (the online loop's
#   subset is SEED=1234) | DATA_DIR data/helpsteer_prompts (validation.jsonl is used) | RUN_NAME eval_checkpoints
#   USE_VLLM 1 (one vLLM engine, adapters swapped in: LoRA checkpoints only; USE_VLLM=0 for full-model folders)
#   RUN_ID eval-checkpoints-<timestamp> | OUTPUT_DIR $BASE_WORK/eval-checkpoints/$RUN_ID | PRESET (empty or cpu)
#   BASE_WORK ${SCRATCH:-${TMPDIR:-/tmp}} | CACHE_DIR $BASE_WORK/hf-cache
# PRESET=cpu changes the defaults (each still overridable by its env var): BASELINE_MODEL smollm2-135m-instruct,
#   rule-based judge, EVAL_STYLES "short no_lists answer_directly_reduce_formatting" (the CPU quickstart's styles),
#   EVAL_N 24, 96 new tokens, DATA_DIR data/mtbench_prompts, OUTPUT_DIR runs/<RUN_ID>, CPU.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

PRESET="${PRESET:-}"
RUN_ID="${RUN_ID:-eval-checkpoints-$(date +%Y%m%d-%H%M%S)}"
case "$PRESET" in
  cpu)
    BASELINE_MODEL="${BASELINE_MODEL:-smollm2-135m-instruct}"
    EVAL_STYLES="${EVAL_STYLES:-short no_lists answer_directly_reduce_formatting}"
    EVAL_N="${EVAL_N:-24}"
    DATA_DIR="${DATA_DIR:-$REPO_ROOT/data/mtbench_prompts}"
    OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/runs/$RUN_ID}"
    ;;
  "") ;;
  *) echo "error: unknown PRESET=$PRESET (use PRESET=cpu or leave it empty)" >&2; exit 1 ;;
esac

sdpo_require CHECKPOINTS "Set it to the checkpoint folders to evaluate, e.g. CHECKPOINTS=\"runs/x/checkpoints/step_5 runs/x/checkpoints/step_10\"."
sdpo_require BASELINE_MODEL "Set it to the model the checkpoints are compared with, e.g. BASELINE_MODEL=Qwen/Qwen3-8B."
EVAL_STYLES="${EVAL_STYLES:-less_filler_praise_sycophancy no_emojis answer_directly_reduce_formatting}"
USER_MODEL="${USER_MODEL:-Qwen/Qwen3-32B}"
EVAL_N="${EVAL_N:-100}"
SEED="${SEED:-424242}"
DATA_DIR="${DATA_DIR:-$REPO_ROOT/data/helpsteer_prompts}"
RUN_NAME="${RUN_NAME:-eval_checkpoints}"
USE_VLLM="${USE_VLLM:-1}"
OUTPUT_DIR="${OUTPUT_DIR:-$BASE_WORK/eval-checkpoints/$RUN_ID}"

read -r -a checkpoints <<< "$CHECKPOINTS"
read -r -a eval_styles <<< "$EVAL_STYLES"
cmd=("$PYTHON" auxiliary/eval_checkpoints.py
  --checkpoints "${checkpoints[@]}" --baseline_model "$BASELINE_MODEL" --eval_styles "${eval_styles[@]}"
  --val_jsonl "$DATA_DIR/validation.jsonl" --eval_n "$EVAL_N" --seed "$SEED"
  --out_dir "$OUTPUT_DIR" --run_name "$RUN_NAME")
if [[ "$PRESET" == cpu ]]; then
  cmd+=(--judge_backend rule --eval_max_new_tokens 96 --device cpu --dtype auto)
else
  cmd+=(--user_model_name_or_path "$USER_MODEL" --judge_local --user_vllm)
  if [[ "$USE_VLLM" == 1 ]]; then
    cmd+=(--use_vllm)
  fi
fi

echo "[eval_checkpoints] $(date '+%F %T') checkpoints=${#checkpoints[@]} baseline=$BASELINE_MODEL styles=$EVAL_STYLES eval_n=$EVAL_N out=$OUTPUT_DIR preset=${PRESET:-none}" >&2
sdpo_mkdir "$OUTPUT_DIR"
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
