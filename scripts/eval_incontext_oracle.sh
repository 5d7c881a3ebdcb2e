#!/usr/bin/env bash
# In-context oracle (auxiliary/eval_incontext_oracle.py): the policy is told each persona in a system message;
# a judge compares those answers with the same policy's plain answers. An upper bound without learning.
#
#   ./scripts/eval_incontext_oracle.sh                   # reference GPU setup: Qwen3-8B on vLLM, Qwen3-32B judge on vLLM
#   PRESET=cpu ./scripts/eval_incontext_oracle.sh        # embedded SmolLM2-135M, rule-based judge, MT-Bench prompts
#   ./scripts/eval_incontext_oracle.sh --dry-run --max_new_tokens 512   # print the command; extra arguments are forwarded
#
# Env (defaults): MODEL Qwen/Qwen3-8B | JUDGE_MODEL Qwen/Qwen3-32B | EVAL_N 100 | SEED 1234
#   DATA_DIR data/tldr_prompts_unique (validation.jsonl is used) | STYLES (empty: the 8 core styles)
#   RUN_NAME incontext_oracle | RUN_ID eval-incontext-oracle-<timestamp>
#   OUTPUT_DIR $BASE_WORK/eval-incontext-oracle/$RUN_ID | PRESET (empty or cpu)
#   BASE_WORK ${SCRATCH:-${TMPDIR:-/tmp}} | CACHE_DIR $BASE_WORK/hf-cache
# PRESET=cpu changes the defaults (each still overridable by its env var): MODEL smollm2-135m-instruct, rule-based
#   judge, STYLES "short no_lists answer_directly_reduce_formatting" (styles a program can check), EVAL_N 16,
#   96 new tokens, DATA_DIR data/mtbench_prompts, OUTPUT_DIR runs/<RUN_ID>, CPU.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

PRESET="${PRESET:-}"
RUN_ID="${RUN_ID:-eval-incontext-oracle-$(date +%Y%m%d-%H%M%S)}"
case "$PRESET" in
  cpu)
    MODEL="${MODEL:-smollm2-135m-instruct}"
    STYLES="${STYLES:-short no_lists answer_directly_reduce_formatting}"
    EVAL_N="${EVAL_N:-16}"
    DATA_DIR="${DATA_DIR:-$REPO_ROOT/data/mtbench_prompts}"
    OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/runs/$RUN_ID}"
    ;;
  "") ;;
  *) echo "error: unknown PRESET=$PRESET (use PRESET=cpu or leave it empty)" >&2; exit 1 ;;
esac

MODEL="${MODEL:-Qwen/Qwen3-8B}"
JUDGE_MODEL="${JUDGE_MODEL:-Qwen/Qwen3-32B}"
EVAL_N="${EVAL_N:-100}"
SEED="${SEED:-1234}"
DATA_DIR="${DATA_DIR:-$REPO_ROOT/data/tldr_prompts_unique}"
STYLES="${STYLES:-}"
RUN_NAME="${RUN_NAME:-incontext_oracle}"
OUTPUT_DIR="${OUTPUT_DIR:-$BASE_WORK/eval-incontext-oracle/$RUN_ID}"

cmd=("$PYTHON" auxiliary/eval_incontext_oracle.py
  --model "$MODEL" --val_jsonl "$DATA_DIR/validation.jsonl" --eval_n "$EVAL_N" --seed "$SEED"
  --eval_dir "$OUTPUT_DIR" --run_name "$RUN_NAME")
if [[ -n "$STYLES" ]]; then
  read -r -a styles <<< "$STYLES"
  cmd+=(--styles "${styles[@]}")
fi
if [[ "$PRESET" == cpu ]]; then
  cmd+=(--judge_backend rule --max_new_tokens 96 --device cpu --dtype auto)
  judge="rule-based"
else
  cmd+=(--judge_model "$JUDGE_MODEL" --judge_backend vllm --use_vllm)
  judge="$JUDGE_MODEL"
fi

echo "[eval_incontext_oracle] $(date '+%F %T') model=$MODEL judge=$judge eval_n=$EVAL_N styles=${STYLES:-core} out=$OUTPUT_DIR preset=${PRESET:-none}" >&2
sdpo_mkdir "$OUTPUT_DIR"
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
