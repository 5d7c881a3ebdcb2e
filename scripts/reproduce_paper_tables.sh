#!/usr/bin/env bash
# The paper's offline results (arXiv 2603.12273, §4.1, App. C Table 5), one TABLE at a time:
# data preparation → training → benchmark evaluation → the table (benchmark_table.md / .json).
#
#   TABLE=table2 ./scripts/reproduce_paper_tables.sh    # Qwen3-4B before → after SDPO on WildFeedback (MODEL=... for 8B, Olmo3)
#   TABLE=table3 ./scripts/reproduce_paper_tables.sh    # Qwen3-8B, SDPO on uncurated random WildChat
#   TABLE=table4 ./scripts/reproduce_paper_tables.sh    # Qwen3-4B: SFT on the logged replies vs SDPO
#   TABLE=table6 ./scripts/reproduce_paper_tables.sh    # Qwen3-8B: TruthfulQA MC1, HellaSwag, CSQA before → after
#   TABLE=lr_sweep ./scripts/reproduce_paper_tables.sh  # Qwen3-4B, SDPO at lr {1,2,3,5}e-6 (Table 5's caption)
#   TABLE=table2 ./scripts/reproduce_paper_tables.sh --dry-run   # print every step's command, run nothing
#
# Env: TABLE (required) | MODEL (per table, below) | SKIP_PREPARE=1 (the data is already there) | STEPS (default
#   "prepare train eval": a subset reruns part of a pipeline) | WORLD_SIZE 4 (processes; with per-device batch 4 and
#   accumulation 2 this is Table 5's batch 32 — the launch stops if another setting breaks it) | DATA_DIR
#   (default data/wildfeedback or data/wildchat) | RUN_ID (<table>-<timestamp>) | OUTPUT_DIR
#   ($BASE_WORK/reproduce-paper/<RUN_ID>: train-<method>-lr<lr>/ per run, benchmarks/ for the table)
#   | BASE_WORK | CACHE_DIR, plus what the evaluation needs (scripts/eval_benchmarks.sh: JUDGE_BACKEND, JUDGE_MODEL,
#   JUDGE_BASE_URL, ALPACA_EVAL_DATA, ARENA_HARD_DIR, BACKEND). Extra arguments go to every training run.
# Hardware: one node with WORLD_SIZE GPUs (80 GB class) for training; the evaluation runs the model on vLLM (GPU 0)
#   and calls the judge (default Claude through ANTHROPIC_API_KEY; the paper's GPT-4-Turbo / GPT-4.1 via
#   JUDGE_BACKEND=openai).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

TABLE="${TABLE:-}"
sdpo_require TABLE "Choose the table to reproduce: TABLE=table2, table3, table4, table6 or lr_sweep."
STEPS="${STEPS:-prepare train eval}"
GLOBAL_BATCH=32                                 # Table 5, §4.1 column: batch size 32
EPOCHS=2                                        # Table 5: 2 epochs
DATASET=wildfeedback                            # §4.1: WildFeedback, 14k conversations → ~50k tuples
METHODS=(sdpo)
case "$TABLE" in
  table2)
    MODEL="${MODEL:-Qwen/Qwen3-4B}"             # Table 2 rows: Qwen3-4B/8B, Olmo3-7B-Instruct-SFT/DPO (MODEL=...)
    LRS=(2e-6)                                  # Table 5: lr 2e-6
    TASKS=table2                                # Table 2: AE2 LC, IFEval, AH-v2 hard/creative, MMLU-Pro
    ;;
  table3)
    MODEL="${MODEL:-Qwen/Qwen3-8B}"             # Table 3: Qwen3-8B
    DATASET=wildchat                            # Table 3: uncurated random WildChat, 14k conversations / ~50k tuples
    LRS=(2e-6)                                  # Table 5: lr 2e-6 (paper silent on a separate one for WildChat)
    TASKS=table2                                # Table 3 has Table 2's columns
    ;;
  table4)
    MODEL="${MODEL:-Qwen/Qwen3-4B}"             # Table 4: Qwen3-4B
    METHODS=(sft sdpo)                          # Table 4: SFT on the logged completions y, beside SDPO
    LRS=(2e-6)                                  # Table 5 caption: SFT's lr swept the same way, best 2e-6
    TASKS=table2                                # Table 4 has Table 2's columns
    ;;
  table6)
    MODEL="${MODEL:-Qwen/Qwen3-8B}"             # Table 6: Qwen3-8B
    LRS=(2e-6)                                  # Table 5: lr 2e-6
    TASKS=table6                                # Table 6: TruthfulQA MC1, HellaSwag, CommonsenseQA
    ;;
  lr_sweep)
    MODEL="${MODEL:-Qwen/Qwen3-4B}"             # Table 5 caption: swept on Qwen3-4B
    LRS=(1e-6 2e-6 3e-6 5e-6)                   # Table 5 caption: {1,2,3,5}e-6
    TASKS=table2                                # paper silent on the sweep's metric: Table 2's columns
    ;;
  *) echo "error: unknown TABLE=$TABLE (use table2, table3, table4, table6 or lr_sweep)" >&2; exit 1 ;;
esac
if [[ "$DATASET" == wildchat ]]; then
  DATA_DIR="${DATA_DIR:-$REPO_ROOT/data/wildchat}"
  TRAIN_JSONL="$DATA_DIR/wildchat_interactions_v1.jsonl"
  PREPARE=(./scripts/prepare_data_wildchat.sh --max_conversations 14000)   # Table 3: 14k conversations
else
  DATA_DIR="${DATA_DIR:-$REPO_ROOT/data/wildfeedback}"
  TRAIN_JSONL="$DATA_DIR/wildfeedback_interactions.jsonl"
  PREPARE=(./scripts/prepare_data_wildfeedback.sh)   # §4.1: history truncated to the last 5 messages (its default)
fi
WORLD_SIZE="${WORLD_SIZE:-4}"                   # paper silent on the GPU count; 4 x 4 x 2 = Table 5's 32
RUN_ID="${RUN_ID:-$TABLE-$(date +%Y%m%d-%H%M%S)}"
OUTPUT_DIR="${OUTPUT_DIR:-$BASE_WORK/reproduce-paper/$RUN_ID}"

DRY=()
if [[ "$DRY_RUN" == 1 ]]; then DRY=(--dry-run); fi
STEP=0
step() {
  local name="$1"
  shift
  STEP=$((STEP + 1))
  echo "[reproduce_paper_tables] $TABLE step $STEP: $name"
  "$@" "${DRY[@]}"
}
wants() { [[ " $STEPS " == *" $1 "* ]]; }

echo "[reproduce_paper_tables] $(date '+%F %T') $TABLE: model=$MODEL data=$TRAIN_JSONL methods=${METHODS[*]}" \
  "lrs=${LRS[*]} global batch=$GLOBAL_BATCH out=$OUTPUT_DIR" >&2
if wants prepare && [[ "${SKIP_PREPARE:-0}" != 1 ]]; then
  step "prepare $DATASET" env OUT_DIR="$DATA_DIR" "${PREPARE[@]}"
fi
CHECKPOINTS=()
LABELS=()
for method in "${METHODS[@]}"; do
  for lr in "${LRS[@]}"; do
    run_dir="$OUTPUT_DIR/train-$method-lr$lr"
    CHECKPOINTS+=("$run_dir/final_model")
    LABELS+=("$method-lr$lr")
    if wants train; then
      # Table 5 (§4.1): max prompt / completion 2048 / 2048, warm-up 5% cosine, 8-bit AdamW, temperature 1
      # (no sampling offline) — the trainer's defaults; the batch is checked against GLOBAL_BATCH at launch.
      step "train $method lr $lr" env TRAIN_JSONL="$TRAIN_JSONL" BASE_MODEL="$MODEL" METHOD="$method" LR="$lr" \
        NUM_EPOCHS="$EPOCHS" GLOBAL_BATCH="$GLOBAL_BATCH" WORLD_SIZE="$WORLD_SIZE" OUTPUT_DIR="$run_dir" \
        RUN_ID="$RUN_ID-$method-lr$lr" ./scripts/train_offline_sdpo.sh --max_context_length 2048 \
        --max_completion_length 2048 "${SDPO_ARGS[@]}"
    fi
  done
done
if wants eval; then
  # The table: the base model's row, one row per trained model, its delta to the base, the paper's rows.
  step "evaluate and write the table" env CHECKPOINT="${CHECKPOINTS[*]}" MODEL_LABELS="${LABELS[*]}" \
    BASE_MODEL="$MODEL" TASKS="$TASKS" OUTPUT_DIR="$OUTPUT_DIR/benchmarks" ./scripts/eval_benchmarks.sh
fi
