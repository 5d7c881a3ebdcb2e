#!/usr/bin/env bash
# Online SDPO: interleaved training on simulated-user follow-ups and periodic pairwise evaluation.
#
#   ./scripts/eval_online_sdpo.sh                      # reference GPU setup (Qwen3-8B policy, Qwen3-32B user/judge, vLLM)
#   MODEL=Qwen/Qwen3-4B STYLE=concise_casual_beginner DATA_DIR=./data/tldr_prompts_unique SYSTEM_PROMPT=tldr \
#     ./scripts/eval_online_sdpo.sh
#   PRESET=cpu ./scripts/eval_online_sdpo.sh           # embedded SmolLM2-135M, rule-based user and judge, MT-Bench prompts
#   ./scripts/eval_online_sdpo.sh --dry-run --eval_every 5   # print the command; extra arguments go to eval_online_sdpo.py
#   WORLD_SIZE=2 PRESET=cpu ./scripts/eval_online_sdpo.sh   # 2 CPU processes (DDP over gloo), one results file
#   WORLD_SIZE=2 PRESET=cpu PARALLELISM=fsdp2 ./scripts/eval_online_sdpo.sh   # the same, policy sharded (FSDP2)
#   WORLD_SIZE=8 ACCELERATE_CONFIG=accelerate_configs/fsdp.yaml ./scripts/eval_online_sdpo.sh   # FSDP2 on 8 GPUs
#   WORLD_SIZE=4 VLLM_MODE=server VLLM_SERVER_URL=http://gpu-node:8000 ./scripts/eval_online_sdpo.sh   # see docs/scaling.md
#
# Env (defaults): MODEL Qwen/Qwen3-8B | USER_MODEL Qwen/Qwen3-32B | STYLE no_emojis | EVAL_STYLES (empty)
#   LR 5e-6 | LOSS_MODE full_distillation | TRAIN_N 15 | EVAL_N 100 | EVAL_EVERY 3 | TRAIN_STEPS_PER_EXAMPLE 1
#   SEED 1234 | DATA_DIR data/helpsteer_prompts | BASELINE_MODEL (empty: the policy before training)
#   RUN_NAME eval_online_sdpo | RUN_ID eval-online-sdpo-<timestamp> | OUTPUT_DIR $BASE_WORK/eval-online-sdpo/$RUN_ID
#   INTERACTIONS_PER_STEP 1 (interactions per optimizer step) | STYLE_SCHEDULE (empty; "styleA:N,styleB:M")
#   ORACLE (empty; 1 = judge the in-context oracle first) | SYSTEM_PROMPT general (or tldr) | REPORT_TO none
#   STYLE_BASELINE base (or introduced: each scheduled style against the policy of its introduction, Fig. 6)
#   PROTOCOL reasoning (or paper: one-character A/B/C judge, very brief user, App. D.3)
#   BASE_WORK ${SCRATCH:-${TMPDIR:-/tmp}} | CACHE_DIR $BASE_WORK/hf-cache | PRESET (empty or cpu)
#   VLLM_MODE colocate (or server: the policy generates on VLLM_SERVER_URL, which gets each new adapter)
# Launch (as scripts/train_offline_sdpo.sh): WORLD_SIZE 1 → python; WORLD_SIZE N > 1 → accelerate launch with N
#   processes, each taking INTERACTIONS_PER_STEP / N interactions of every step (INTERACTIONS_PER_STEP defaults
#   to WORLD_SIZE): on GPUs with --config_file $ACCELERATE_CONFIG (default multigpu_accelerate_config.yaml, DDP),
#   without GPUs (or CPU=1) accelerate's multi-GPU launcher on CPU processes (DDP over gloo), $(nproc)/N threads
#   each. PARALLELISM (empty = auto) ddp or fsdp2 (--parallelism: the policy sharded with torch's fully_shard, on
#   GPUs and CPU processes alike); an ACCELERATE_CONFIG with distributed_type FSDP and fsdp_version 2 (e.g.
#   accelerate_configs/fsdp.yaml) means fsdp2. FSDP1 and DeepSpeed configs stop with one line.
# PRESET=cpu changes the defaults (each still overridable by its env var): MODEL smollm2-135m-instruct,
#   rule-based user and judge, STYLE no_punctuation, EVAL_STYLES short, ORACLE 1, --dtype auto,
#   LR 1e-4 with LoRA r 16, LOSS_MODE simple_signal, TRAIN_N 16, EVAL_N 24, EVAL_EVERY 4, 96 new tokens,
#   DATA_DIR data/mtbench_prompts, OUTPUT_DIR runs/<RUN_ID>.
# Two jobs on one machine: give each its share of the cores (OMP_NUM_THREADS=1 each on 2 cores); with
# default threads each spins on every core and both run several times slower.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

PRESET="${PRESET:-}"
WORLD_SIZE="${WORLD_SIZE:-1}"
if [[ ! "$WORLD_SIZE" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: WORLD_SIZE must be a whole number >= 1, got '$WORLD_SIZE'" >&2
  exit 1
fi
RUN_ID="${RUN_ID:-eval-online-sdpo-$(date +%Y%m%d-%H%M%S)}"
case "$PRESET" in
  cpu)
    MODEL="${MODEL:-smollm2-135m-instruct}"
    # Styles whose rule-based judge decides most pairs of 96-token answers (oracle coverage 0.88 for no_punctuation,
    # 0.44 for short, 0.25 for no_lists on 16 MT-Bench prompts), and the oracle line to read them against.
    STYLE="${STYLE:-no_punctuation}"
    EVAL_STYLES="${EVAL_STYLES-short}"
    ORACLE="${ORACLE:-1}"
    LR="${LR:-1e-4}"
    LOSS_MODE="${LOSS_MODE:-simple_signal}"
    TRAIN_N="${TRAIN_N:-16}"
    EVAL_N="${EVAL_N:-24}"
    EVAL_EVERY="${EVAL_EVERY:-4}"
    DATA_DIR="${DATA_DIR:-$REPO_ROOT/data/mtbench_prompts}"
    OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/runs/$RUN_ID}"
    ;;
  "") ;;
  *) echo "error: unknown PRESET=$PRESET (use PRESET=cpu or leave it empty)" >&2; exit 1 ;;
esac

MODEL="${MODEL:-Qwen/Qwen3-8B}"
USER_MODEL="${USER_MODEL:-Qwen/Qwen3-32B}"
STYLE="${STYLE:-no_emojis}"
EVAL_STYLES="${EVAL_STYLES:-}"
LR="${LR:-5e-6}"
LOSS_MODE="${LOSS_MODE:-full_distillation}"
TRAIN_N="${TRAIN_N:-15}"
EVAL_N="${EVAL_N:-100}"
EVAL_EVERY="${EVAL_EVERY:-3}"
TRAIN_STEPS_PER_EXAMPLE="${TRAIN_STEPS_PER_EXAMPLE:-1}"
SEED="${SEED:-1234}"
RUN_NAME="${RUN_NAME:-eval_online_sdpo}"
DATA_DIR="${DATA_DIR:-$REPO_ROOT/data/helpsteer_prompts}"
BASELINE_MODEL="${BASELINE_MODEL:-}"
INTERACTIONS_PER_STEP="${INTERACTIONS_PER_STEP:-$WORLD_SIZE}"
VLLM_MODE="${VLLM_MODE:-colocate}"
VLLM_SERVER_URL="${VLLM_SERVER_URL:-}"
STYLE_SCHEDULE="${STYLE_SCHEDULE:-}"
ORACLE="${ORACLE:-}"
SYSTEM_PROMPT="${SYSTEM_PROMPT:-general}"
STYLE_BASELINE="${STYLE_BASELINE:-base}"
PROTOCOL="${PROTOCOL:-reasoning}"
REPORT_TO="${REPORT_TO:-none}"
export OUTPUT_DIR="${OUTPUT_DIR:-$BASE_WORK/eval-online-sdpo/$RUN_ID}"

read -r -a eval_styles <<< "$EVAL_STYLES"
cmd=(eval_online_sdpo.py
  --model "$MODEL" --lr "$LR" --loss_mode "$LOSS_MODE" --style "$STYLE"
  --train_jsonl "$DATA_DIR/train.jsonl" --val_jsonl "$DATA_DIR/validation.jsonl"
  --train_n "$TRAIN_N" --eval_n "$EVAL_N" --eval_every "$EVAL_EVERY" --train_steps_per_example "$TRAIN_STEPS_PER_EXAMPLE"
  --out_dir "$OUTPUT_DIR" --run_name "$RUN_NAME" --seed "$SEED" --eval_styles "${eval_styles[@]}"
  --interactions_per_step "$INTERACTIONS_PER_STEP" --system_prompt "$SYSTEM_PROMPT" --report_to "$REPORT_TO"
  --style_baseline "$STYLE_BASELINE" --protocol "$PROTOCOL")
if [[ -n "$STYLE_SCHEDULE" ]]; then
  cmd+=(--style_schedule "$STYLE_SCHEDULE")
fi
if [[ -n "$ORACLE" && "$ORACLE" != 0 ]]; then
  cmd+=(--oracle)
fi
if [[ "$PRESET" == cpu ]]; then
  cmd+=(--user_backend rule --judge_backend rule --use_lora --lora_r 16 --lora_alpha 32
    --max_new_tokens 96 --eval_max_new_tokens 96 --device cpu --dtype auto)
else
  cmd+=(--user_model_name_or_path "$USER_MODEL" --judge_local --user_vllm --use_lora --use_vllm
    --debug_first_example --save_checkpoints)
fi
if [[ -n "$BASELINE_MODEL" ]]; then
  cmd+=(--baseline_model "$BASELINE_MODEL")
fi
if [[ "$VLLM_MODE" != colocate || -n "$VLLM_SERVER_URL" ]]; then
  cmd+=(--use_vllm --vllm_mode "$VLLM_MODE")
  [[ -n "$VLLM_SERVER_URL" ]] && cmd+=(--vllm_server_url "$VLLM_SERVER_URL")
fi

# One process, or WORLD_SIZE processes under accelerate (DDP or FSDP2; gloo on CPU processes).
if [[ -z "${CPU:-}" ]]; then
  GPU_COUNT=0
  if command -v nvidia-smi > /dev/null 2>&1; then GPU_COUNT="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"; fi
  if [[ "$GPU_COUNT" -gt 0 && "$PRESET" != cpu ]]; then CPU=0; else CPU=1; fi
fi
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$REPO_ROOT/multigpu_accelerate_config.yaml}"
PARALLELISM="${PARALLELISM:-}"
case "$PARALLELISM" in
  ""|auto|ddp|fsdp2) ;;
  *) echo "error: unknown PARALLELISM=$PARALLELISM (use ddp or fsdp2, or leave it empty)" >&2; exit 1 ;;
esac
if [[ -f "$ACCELERATE_CONFIG" ]]; then
  case "$(sed -n 's/^distributed_type:[[:space:]]*//p' "$ACCELERATE_CONFIG" | tr -d "'\" \r")" in
    DEEPSPEED)
      echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG asks for DeepSpeed, which the online loop does not run: use accelerate_configs/fsdp.yaml or PARALLELISM=fsdp2 (FSDP2), or multigpu_accelerate_config.yaml (DDP)" >&2
      exit 1 ;;
    FSDP)
      if [[ "$(sed -n 's/^[[:space:]]*fsdp_version:[[:space:]]*//p' "$ACCELERATE_CONFIG" | tr -d "'\" \r")" != 2 ]]; then
        echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG asks for FSDP1, which the online loop does not run: set fsdp_version: 2 in it (as accelerate_configs/fsdp.yaml does)" >&2
        exit 1
      fi
      if [[ "$PARALLELISM" == ddp ]]; then
        echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG asks for FSDP2 but PARALLELISM=ddp: unset one of them" >&2
        exit 1
      fi
      PARALLELISM=fsdp2 ;;
  esac
fi
if [[ -n "$PARALLELISM" && "$PARALLELISM" != auto ]]; then
  cmd+=(--parallelism "$PARALLELISM")
fi
if [[ "$WORLD_SIZE" -le 1 ]]; then
  LAUNCH=("$PYTHON")
elif [[ "$CPU" == 1 ]]; then
  THREADS=$(( $(nproc) / WORLD_SIZE )); [[ "$THREADS" -ge 1 ]] || THREADS=1
  LAUNCH=(env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}")
  # FSDP2 frees each layer's gathered weights after every use; a fixed mmap threshold hands them back to the OS
  # (with glibc's adaptive one they stay on the heap: +1 GB peak per process measured by bench/fsdp_memory.py).
  [[ "$PARALLELISM" == fsdp2 ]] && LAUNCH+=(MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-65536}")
  LAUNCH+=(
    "$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$WORLD_SIZE" --num_machines 1
    --mixed_precision no --dynamo_backend no)
else
  if [[ ! -f "$ACCELERATE_CONFIG" ]]; then
    echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG does not exist (multigpu_accelerate_config.yaml is the DDP one)" >&2
    exit 1
  fi
  LAUNCH=("$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" --num_processes "$WORLD_SIZE")
fi

echo "[eval_online_sdpo] $(date '+%F %T') model=$MODEL style=$STYLE loss=$LOSS_MODE train_n=$TRAIN_N eval_n=$EVAL_N out=$OUTPUT_DIR preset=${PRESET:-none} processes=$WORLD_SIZE ($([[ "$CPU" == 1 ]] && echo CPU || echo GPU)${PARALLELISM:+, $PARALLELISM})" >&2
sdpo_mkdir "$OUTPUT_DIR"
sdpo_run "${LAUNCH[@]}" "${cmd[@]}" "${SDPO_ARGS[@]}"
