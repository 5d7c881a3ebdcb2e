#!/usr/bin/env bash
# Live chat in the browser or any OpenAI client: teach the policy by talking to it, one LoRA adapter per account.
#
#   ./scripts/live_chat.sh                          # CPU: embedded SmolLM2-135M-Instruct, http://127.0.0.1:7860
#   python live_chat.py users add alice --accounts_file accounts.json    # accounts: a login and an API key each
#   ACCOUNTS_FILE=accounts.json HOST=0.0.0.0 ./scripts/live_chat.sh      # several people, on the network
#   PRESET=gpu ACCOUNTS_FILE=accounts.json ./scripts/live_chat.sh        # GPU: Qwen3-8B, LoRA r256, one vLLM engine
#   PORT=8000 ./scripts/live_chat.sh --wait_for_updates --dry-run   # print the command; extra args go to live_chat.py
#
# Env (CPU defaults): MODEL smollm2-135m-instruct | LR 1e-4 | LOSS_MODE simple_signal | LORA_R 16 | LORA_ALPHA 32
#   MAX_NEW_TOKENS 96 | TEMPERATURE 0.7 | DEVICE cpu | DTYPE float32 | HOST 127.0.0.1 | PORT 7860
#   ADAPTERS_DIR runs/live_chat (one folder per account; a restart resumes them) | PRESET (empty or gpu)
#   ACCOUNTS_FILE (empty: one local user, no login; required for HOST other than 127.0.0.1) | UPDATE_WORKERS 1
# PRESET=gpu changes the defaults (each still overridable by its env var): MODEL Qwen/Qwen3-8B, LR 5e-6,
#   LOSS_MODE full_distillation, LORA_R 256, LORA_ALPHA 512, MAX_NEW_TOKENS 2048, DEVICE auto, DTYPE bfloat16,
#   --use_vllm, ADAPTERS_DIR $BASE_WORK/live-chat. HOST 0.0.0.0 exposes the page and the API to the network
#   (live_chat.py refuses that without ACCOUNTS_FILE).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

PRESET="${PRESET:-}"
case "$PRESET" in
  gpu)
    MODEL="${MODEL:-Qwen/Qwen3-8B}"
    LR="${LR:-5e-6}"
    LOSS_MODE="${LOSS_MODE:-full_distillation}"
    LORA_R="${LORA_R:-256}"
    LORA_ALPHA="${LORA_ALPHA:-512}"
    MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-2048}"
    DEVICE="${DEVICE:-auto}"
    DTYPE="${DTYPE:-bfloat16}"
    ADAPTERS_DIR="${ADAPTERS_DIR:-$BASE_WORK/live-chat}"
    ;;
  "") ;;
  *) echo "error: unknown PRESET=$PRESET (use PRESET=gpu or leave it empty for CPU)" >&2; exit 1 ;;
esac

MODEL="${MODEL:-smollm2-135m-instruct}"
LR="${LR:-1e-4}"
LOSS_MODE="${LOSS_MODE:-simple_signal}"
LORA_R="${LORA_R:-16}"
LORA_ALPHA="${LORA_ALPHA:-32}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-96}"
TEMPERATURE="${TEMPERATURE:-0.7}"
DEVICE="${DEVICE:-cpu}"
DTYPE="${DTYPE:-float32}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-7860}"
ADAPTERS_DIR="${ADAPTERS_DIR:-$REPO_ROOT/runs/live_chat}"
ACCOUNTS_FILE="${ACCOUNTS_FILE:-}"
UPDATE_WORKERS="${UPDATE_WORKERS:-1}"
export GRADIO_ANALYTICS_ENABLED="${GRADIO_ANALYTICS_ENABLED:-False}"

cmd=("$PYTHON" live_chat.py
  --model "$MODEL" --lr "$LR" --loss_mode "$LOSS_MODE" --use_lora --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA"
  --max_new_tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE" --device "$DEVICE" --dtype "$DTYPE"
  --adapters_dir "$ADAPTERS_DIR" --host "$HOST" --port "$PORT" --update_workers "$UPDATE_WORKERS")
if [[ -n "$ACCOUNTS_FILE" ]]; then
  cmd+=(--accounts_file "$ACCOUNTS_FILE")
fi
if [[ "$PRESET" == gpu ]]; then
  cmd+=(--use_vllm)
fi

echo "[live_chat] $(date '+%F %T') model=$MODEL adapters=$ADAPTERS_DIR url=http://$HOST:$PORT preset=${PRESET:-cpu}" >&2
sdpo_mkdir "$ADAPTERS_DIR"
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
