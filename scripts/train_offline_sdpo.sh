#!/usr/bin/env bash
# Offline SDPO (or its SFT baseline) on logged interactions (offline_sdpo/main_offline_sdpo.py), one or several processes.
#
#   TRAIN_JSONL=data/sharegpt/sharegpt_interactions.jsonl ./scripts/train_offline_sdpo.sh
#   TRAIN_JSONL=... WORLD_SIZE=1 BASE_MODEL=smollm2-135m-instruct ./scripts/train_offline_sdpo.sh --max_steps 20 --report_to none
#   TRAIN_JSONL=... CPU=1 WORLD_SIZE=2 ./scripts/train_offline_sdpo.sh ...     # 2 CPU processes (DDP over gloo)
#   TRAIN_JSONL=... METHOD=sft ./scripts/train_offline_sdpo.sh                # Table 4's baseline: SFT on the logged y
#   ./scripts/train_offline_sdpo.sh --dry-run                                  # print the command, run nothing
#
# Environment (defaults): TRAIN_JSONL (required; any --dataset_name: a .jsonl/.parquet file, folder or Hub id),
# METHOD sdpo (or sft), BASE_MODEL Qwen/Qwen3-4B, LR 2e-6, BS 4 (per device), GA 2 (4 x 2 x 4 processes = Table 5's
# global batch of 32), GLOBAL_BATCH (unset; when set, --global_batch_size: a launch giving another stops), NUM_EPOCHS 2, WORLD_SIZE 4, ACCELERATE_CONFIG <repo>/multigpu_accelerate_config.yaml (GPU runs
# with WORLD_SIZE > 1), CPU auto (1 when no GPU is visible), WANDB_PROJECT offline-sdpo,
# WANDB_NAME <METHOD>-<BASE_MODEL, / → ->-lr<LR>-bs<BS>-ga<GA>, RUN_ID offline-sdpo-<timestamp>,
# OUTPUT_DIR $BASE_WORK/offline-sdpo/$RUN_ID (exported). Extra arguments (any flag of
# offline_sdpo/main_offline_sdpo.py, e.g. --config run.yaml) go to the Python script and win over these.
#
# Launch: WORLD_SIZE <= 1 → python; GPU → accelerate launch --config_file $ACCELERATE_CONFIG
# --num_processes $WORLD_SIZE (WORLD_SIZE wins over the config's num_processes, with a note when they
# differ; an FSDP/DeepSpeed ACCELERATE_CONFIG goes through accelerate even with WORLD_SIZE=1); CPU →
# accelerate launch --multi_gpu ... --mixed_precision no (DDP over gloo; its --cpu flag runs one process).
# An FSDP/DeepSpeed ACCELERATE_CONFIG on CPU, or DeepSpeed not installed, stops with one line.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

sdpo_require TRAIN_JSONL "Point it at the training data (an interaction JSONL, a Parquet file, a dataset folder or a Hub id), e.g.
  TRAIN_JSONL=data/sharegpt/sharegpt_interactions.jsonl $0
(build one with the auxiliary/preprocess_*.py scripts; tests/fixtures/offline/interactions.jsonl is a tiny example)."
BASE_MODEL="${BASE_MODEL:-Qwen/Qwen3-4B}"
LR="${LR:-2e-6}"
BS="${BS:-4}"
GA="${GA:-2}"
METHOD="${METHOD:-sdpo}"
NUM_EPOCHS="${NUM_EPOCHS:-2}"
WORLD_SIZE="${WORLD_SIZE:-4}"
ACCELERATE_CONFIG_GIVEN="${ACCELERATE_CONFIG:-}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$REPO_ROOT/multigpu_accelerate_config.yaml}"
RUN_ID="${RUN_ID:-offline-sdpo-$(date +%Y%m%d-%H%M%S)}"
export OUTPUT_DIR="${OUTPUT_DIR:-$BASE_WORK/offline-sdpo/$RUN_ID}"
export WANDB_PROJECT="${WANDB_PROJECT:-offline-sdpo}"
export WANDB_NAME="${WANDB_NAME:-$METHOD-${BASE_MODEL//\//-}-lr${LR}-bs${BS}-ga${GA}}"

if [[ ! "$WORLD_SIZE" =~ ^[0-9]+$ ]]; then
  echo "error: WORLD_SIZE must be a whole number, got '$WORLD_SIZE'" >&2
  exit 1
fi
if [[ -z "${CPU:-}" ]]; then
  GPU_COUNT=0
  if command -v nvidia-smi > /dev/null 2>&1; then GPU_COUNT="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"; fi
  if [[ "$GPU_COUNT" -gt 0 ]]; then CPU=0; else CPU=1; fi
fi

# An FSDP / DeepSpeed config chosen by the user must really run: accelerate runs both only on GPUs (CPU
# processes would silently train with plain DDP), and DeepSpeed must be importable before anything starts.
SHARDING=""
if [[ -n "$ACCELERATE_CONFIG_GIVEN" && -f "$ACCELERATE_CONFIG" ]]; then
  case "$(sed -n 's/^distributed_type:[[:space:]]*//p' "$ACCELERATE_CONFIG" | tr -d "'\" \r")" in
    FSDP) SHARDING=FSDP ;;
    DEEPSPEED) SHARDING=DeepSpeed ;;
  esac
fi
if [[ -n "$SHARDING" && "$CPU" == 1 ]]; then
  echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG asks for $SHARDING, which accelerate runs only on GPUs (CPU processes would silently run plain DDP): unset ACCELERATE_CONFIG (CPU=1 trains with DDP over gloo) or run on GPUs" >&2
  exit 1
fi
if [[ "$SHARDING" == DeepSpeed ]] && ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('deepspeed') is None)" 2> /dev/null; then
  echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG needs DeepSpeed, which $PYTHON cannot import: pip install deepspeed" >&2
  exit 1
fi

SCRIPT="$REPO_ROOT/offline_sdpo/main_offline_sdpo.py"
PY_ARGS=(
  --method "$METHOD"
  --dataset_name "$TRAIN_JSONL"
  --model_name_or_path "$BASE_MODEL"
  --learning_rate "$LR"
  --per_device_train_batch_size "$BS"
  --gradient_accumulation_steps "$GA"
  --num_train_epochs "$NUM_EPOCHS"
  --output_dir "$OUTPUT_DIR"
  --run_name "$WANDB_NAME"
  --project "$WANDB_PROJECT"
)
if [[ -n "${GLOBAL_BATCH:-}" ]]; then PY_ARGS+=(--global_batch_size "$GLOBAL_BATCH"); fi
PY_ARGS+=("${SDPO_ARGS[@]}")

if [[ "$WORLD_SIZE" -le 1 && -z "$SHARDING" ]]; then
  LAUNCH=("$PYTHON" "$SCRIPT")
elif [[ "$CPU" == 1 ]]; then
  # No GPU: accelerate's multi-GPU launcher starts WORLD_SIZE processes that train over gloo.
  THREADS=$(( $(nproc) / WORLD_SIZE )); [[ "$THREADS" -ge 1 ]] || THREADS=1
  LAUNCH=(env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}"
    "$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$WORLD_SIZE" --num_machines 1
    --mixed_precision no --dynamo_backend no "$SCRIPT")
else
  if [[ ! -f "$ACCELERATE_CONFIG" ]]; then
    echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG does not exist (see accelerate_configs/ for DDP, FSDP and DeepSpeed)" >&2
    exit 1
  fi
  CONFIG_PROCESSES="$(sed -n 's/^num_processes:[[:space:]]*\([0-9]*\).*/\1/p' "$ACCELERATE_CONFIG")"
  if [[ -n "$CONFIG_PROCESSES" && "$CONFIG_PROCESSES" != "$WORLD_SIZE" ]]; then
    echo "note: $ACCELERATE_CONFIG says num_processes: $CONFIG_PROCESSES; launching WORLD_SIZE=$WORLD_SIZE processes" >&2
  fi
  LAUNCH=("$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" --num_processes "$WORLD_SIZE" "$SCRIPT")
fi

echo "== offline $METHOD | $(date '+%Y-%m-%d %H:%M:%S') | $([[ "$CPU" == 1 ]] && echo CPU || echo "GPUs: ${GPU_COUNT:-?}") | WORLD_SIZE=$WORLD_SIZE | ${SHARDING:-DDP}"
echo "== model $BASE_MODEL | lr $LR | global batch $BS x $GA x $WORLD_SIZE processes = $((BS * GA * WORLD_SIZE)) | epochs $NUM_EPOCHS | output $OUTPUT_DIR"
sdpo_mkdir "$OUTPUT_DIR"
sdpo_run "${LAUNCH[@]}" "${PY_ARGS[@]}"
