#!/usr/bin/env bash
# The paper's offline benchmarks (§4.1, Tables 2, 3, 4, 6) for a trained checkpoint and its base
# (auxiliary/eval_benchmarks.py): one table in JSON and Markdown, the paper's numbers beside ours.
#
#   CHECKPOINT=runs/offline/final_model BASE_MODEL=Qwen/Qwen3-4B ./scripts/eval_benchmarks.sh            # Table 2, GPU
#   CHECKPOINT=runs/offline/final_model BASE_MODEL=Qwen/Qwen3-8B TASKS=table6 ./scripts/eval_benchmarks.sh
#   PRESET=cpu ./scripts/eval_benchmarks.sh          # bundled SmolLM2-135M, test fixtures, 2 items per task, offline
#   ./scripts/eval_benchmarks.sh --dry-run --limit 50   # print the command; extra arguments are forwarded
#
# Env (defaults): CHECKPOINT (required: a model or LoRA adapter folder; several, space-separated, give one row each)
#   | MODEL_LABELS (space-separated row labels, default the folder names) | BASE_MODEL (an adapter's base; required
#   for a full model; none = no base row) | TASKS table2 (= alpaca_eval,ifeval,arena_hard,mmlu_pro; table6 =
#   truthfulqa_mc1,hellaswag,commonsense_qa; or any comma list of lm-eval tasks) | BACKEND vllm on GPU, hf on CPU
#   (lm-eval's --model) | APPLY_CHAT_TEMPLATE 1 for table2 (instruction-following of chat models), 0 for table6
#   (log-likelihood tasks, as the harness's defaults) | MAX_MODEL_LEN 8192 (vLLM) | MAX_NEW_TOKENS 2048
#   (pairwise answers) | JUDGE_BACKEND anthropic | JUDGE_MODEL claude-haiku-4-5-20251001 | JUDGE_BASE_URL (openai)
#   ALPACA_EVAL_DATA data/alpaca_eval/alpaca_eval_gpt4_baseline.json | ARENA_HARD_DIR data/arena-hard-v2.0
#   (question.jsonl, model_answer/o3-mini-2025-01-31.jsonl for hard prompts, model_answer/gemini-2.0-flash-001.jsonl
#   for creative writing) | RUN_ID benchmarks-<timestamp> | OUTPUT_DIR $BASE_WORK/benchmarks/$RUN_ID
# The judge sets (AlpacaEval's eval set with the gpt4_turbo reference outputs; Arena-Hard-Auto v2's questions and
# baseline answers) come from those projects' published files; download them once on a machine with network.
# The paper's judges were GPT-4-Turbo (AlpacaEval) and GPT-4.1 (Arena-Hard): JUDGE_BACKEND=openai
# JUDGE_MODEL=gpt-4.1 JUDGE_BASE_URL=https://api.openai.com/v1 reproduces the latter's judge.
# PRESET=cpu: CHECKPOINT smollm2-135m-instruct, BASE_MODEL none, TASKS ifeval,mmlu_pro_biology,truthfulqa_mc1,
#   hellaswag,commonsense_qa from tests/fixtures/benchmarks/lm_eval (no network), --limit 2, 64 generated tokens,
#   OUTPUT_DIR runs/<RUN_ID>.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

PRESET="${PRESET:-}"
RUN_ID="${RUN_ID:-benchmarks-$(date +%Y%m%d-%H%M%S)}"
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; then ON_GPU=1; else ON_GPU=0; fi
EXTRA=()
case "$PRESET" in
  cpu)
    CHECKPOINT="${CHECKPOINT:-smollm2-135m-instruct}"
    BASE_MODEL="${BASE_MODEL:-none}"
    TASKS="${TASKS:-ifeval,mmlu_pro_biology,truthfulqa_mc1,hellaswag,commonsense_qa}"
    BACKEND="${BACKEND:-hf}"
    OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/runs/$RUN_ID}"
    EXTRA=(--data_dir "$REPO_ROOT/tests/fixtures/benchmarks/lm_eval" --limit 2 --gen_kwargs max_gen_toks=64
      --device cpu --dtype float32)
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    ;;
  "") ;;
  *) echo "error: unknown PRESET=$PRESET (use PRESET=cpu or leave it empty)" >&2; exit 1 ;;
esac

sdpo_require CHECKPOINT "Set it to the trained model or LoRA adapter folder, e.g. CHECKPOINT=runs/offline/final_model."
TASKS="${TASKS:-table2}"
BACKEND="${BACKEND:-$([[ "$ON_GPU" == 1 ]] && echo vllm || echo hf)}"
if [[ -z "${APPLY_CHAT_TEMPLATE:-}" ]]; then
  if [[ "$TASKS" == table6 ]]; then APPLY_CHAT_TEMPLATE=0; else APPLY_CHAT_TEMPLATE=1; fi
fi
MAX_MODEL_LEN="${MAX_MODEL_LEN:-8192}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-2048}"
JUDGE_BACKEND="${JUDGE_BACKEND:-anthropic}"
JUDGE_MODEL="${JUDGE_MODEL:-claude-haiku-4-5-20251001}"
ALPACA_EVAL_DATA="${ALPACA_EVAL_DATA:-$REPO_ROOT/data/alpaca_eval/alpaca_eval_gpt4_baseline.json}"
ARENA_HARD_DIR="${ARENA_HARD_DIR:-$REPO_ROOT/data/arena-hard-v2.0}"
OUTPUT_DIR="${OUTPUT_DIR:-$BASE_WORK/benchmarks/$RUN_ID}"

read -r -a checkpoints <<< "$CHECKPOINT"
cmd=("$PYTHON" auxiliary/eval_benchmarks.py
  --model_name_or_path "${checkpoints[@]}" --tasks "$TASKS" --model "$BACKEND" --max_new_tokens "$MAX_NEW_TOKENS"
  --output_dir "$OUTPUT_DIR")
if [[ -n "${BASE_MODEL:-}" ]]; then cmd+=(--base_model "$BASE_MODEL"); fi
if [[ -n "${MODEL_LABELS:-}" ]]; then read -r -a labels <<< "$MODEL_LABELS"; cmd+=(--model_label "${labels[@]}"); fi
if [[ "$APPLY_CHAT_TEMPLATE" == 1 ]]; then cmd+=(--apply_chat_template); fi
if [[ "$BACKEND" == vllm ]]; then cmd+=(--model_args "max_model_len=$MAX_MODEL_LEN,gpu_memory_utilization=0.8"); fi
if [[ ",$TASKS," == *,alpaca_eval,* || ",$TASKS," == *,arena_hard,* || "$TASKS" == table2 ]]; then
  cmd+=(--judge_backend "$JUDGE_BACKEND" --judge_model "$JUDGE_MODEL"
    --alpaca_eval_data "$ALPACA_EVAL_DATA" --arena_hard_questions "$ARENA_HARD_DIR/question.jsonl"
    --arena_hard_baseline "$ARENA_HARD_DIR/model_answer/o3-mini-2025-01-31.jsonl"
    --arena_hard_creative_baseline "$ARENA_HARD_DIR/model_answer/gemini-2.0-flash-001.jsonl")
  if [[ -n "${JUDGE_BASE_URL:-}" ]]; then cmd+=(--judge_base_url "$JUDGE_BASE_URL"); fi
fi
cmd+=("${EXTRA[@]}")

echo "[eval_benchmarks] $(date '+%F %T') checkpoint=$CHECKPOINT base=${BASE_MODEL:-auto} tasks=$TASKS backend=$BACKEND out=$OUTPUT_DIR preset=${PRESET:-none}" >&2
sdpo_mkdir "$OUTPUT_DIR"
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
