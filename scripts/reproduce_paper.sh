#!/usr/bin/env bash
# The paper's online experiments (arXiv 2603.12273, §4.2, App. C Table 5), one FIGURE at a time.
#
#   FIGURE=fig5 ./scripts/reproduce_paper.sh   # TL;DR: Qwen3-4B learns concise/casual/beginner; in-context oracle line
#   FIGURE=fig4 ./scripts/reproduce_paper.sh   # TL;DR: the persona flips to its opposite after 250 interactions
#   FIGURE=fig6 ./scripts/reproduce_paper.sh   # HelpSteer2: Qwen3-8B, three preferences one after another (Claude)
#   FIGURE=fig5 ./scripts/reproduce_paper.sh --dry-run --eval_every 50   # print the command; extra args are forwarded
#
# Data first: ./scripts/prepare_data_tldr.sh (fig4, fig5) or ./scripts/prepare_data_helpsteer.sh (fig6).
# Hardware: the policy trains and generates (vLLM engine, LoRA hot-swapped) on GPU 0 (80 GB class); fig4/5 run the
#   Qwen3-8B user and judge in a vLLM engine on GPU $USER_VLLM_GPU_START (default 1); fig6 needs ANTHROPIC_API_KEY
#   (environment or .env) and bitsandbytes for 8-bit AdamW instead of the second GPU.
#
# Env: FIGURE (required: fig4 | fig5 | fig6). The figure decides the defaults below; each is overridable by its env
#   var: MODEL USER_MODEL USER_VLLM_GPU_START JUDGE_MODEL STYLE (fig5) STYLE_SCHEDULE TRAIN_N EVAL_N EVAL_EVERY
#   INTERACTIONS_PER_STEP LR OPTIM LOSS_MODE TEMPERATURE MAX_PROMPT_TOKENS MAX_NEW_TOKENS EVAL_MAX_NEW_TOKENS
#   SYSTEM_PROMPT ORACLE (1/0) SEED DATA_DIR REPORT_TO (none | wandb | trackio) RUN_NAME (paper_<figure>)
#   RUN_ID (<figure>-<timestamp>) OUTPUT_DIR ($BASE_WORK/reproduce-paper/<RUN_ID>) | BASE_WORK | CACHE_DIR
# Table 5's warm-up 0 / constant schedule is the updater's only schedule, and its 1 epoch is the loop's single pass
# over TRAIN_N prompts, so neither needs a flag.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
sdpo_init "$@"

FIGURE="${FIGURE:-}"
sdpo_require FIGURE "Choose the figure to reproduce: FIGURE=fig4, FIGURE=fig5 or FIGURE=fig6."
case "$FIGURE" in
  fig4 | fig5)
    MODEL="${MODEL:-Qwen/Qwen3-4B}"                         # §4.2 and Table 5
    USER_MODEL="${USER_MODEL:-Qwen/Qwen3-8B}"               # §4.2: simulator and judge
    USER_VLLM_GPU_START="${USER_VLLM_GPU_START:-1}"         # paper silent: its own GPU, next to the policy's
    STYLE="${STYLE:-concise_casual_beginner}"               # §4.2 / Fig. 5
    INTERACTIONS_PER_STEP="${INTERACTIONS_PER_STEP:-16}"    # Table 5 batch size
    OPTIM="${OPTIM:-adamw}"                                 # Table 5
    MAX_PROMPT_TOKENS="${MAX_PROMPT_TOKENS:-1024}"          # Table 5 max prompt (longer prompts are dropped)
    MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-258}"                 # Table 5 max completion
    EVAL_MAX_NEW_TOKENS="${EVAL_MAX_NEW_TOKENS:-258}"       # paper silent: the training budget
    SYSTEM_PROMPT="${SYSTEM_PROMPT:-tldr}"                  # the paper-era TL;DR launcher (SYSTEM_PROMPT tldr)
    ORACLE="${ORACLE:-1}"                                   # Fig. 5 draws the in-context oracle
    EVAL_EVERY="${EVAL_EVERY:-32}"                          # paper silent: every 2 updates
    DATA_DIR="${DATA_DIR:-$REPO_ROOT/data/tldr_prompts_unique}"   # prepare_data_tldr.sh
    if [[ "$FIGURE" == fig4 ]]; then
      # The opposite of concise/casual/beginner on all three axes (App. D.3 names both profiles); 250 interactions
      # each: the flip point is the paper's, the length after it our choice (as long as before). 250 is not a
      # multiple of 16, so the update covering interactions 241-256 mixes the two personas.
      STYLE_SCHEDULE="${STYLE_SCHEDULE:-concise_casual_beginner:250,detailed_professional_expert:250}"
      TRAIN_N="${TRAIN_N:-500}"
    else
      STYLE_SCHEDULE="${STYLE_SCHEDULE:-}"
      TRAIN_N="${TRAIN_N:-256}"                             # paper silent: the paper-era TL;DR launcher's TRAIN_N,
    fi                                                      # past the >95%-after-200 point (§4.2)
    ;;
  fig6)
    MODEL="${MODEL:-Qwen/Qwen3-8B}"                         # §4.2 and Table 5
    JUDGE_MODEL="${JUDGE_MODEL:-claude-haiku-4-5-20251001}" # §4.2: Claude Haiku 4.5 as simulator and judge
    # §4.2: three preferences, 500 interactions each, 1500 in all (the updates covering interactions 481-512 and
    # 993-1024 mix two personas). The paper does not name them here; these are the three single-preference
    # profiles of App. D.3, in the order of the reference's evaluation styles (our choice).
    STYLE_SCHEDULE="${STYLE_SCHEDULE:-less_filler_praise_sycophancy:500,no_emojis:500,answer_directly_reduce_formatting:500}"
    TRAIN_N="${TRAIN_N:-1500}"
    INTERACTIONS_PER_STEP="${INTERACTIONS_PER_STEP:-32}"    # Table 5 batch size
    OPTIM="${OPTIM:-adamw_8bit}"                            # Table 5
    MAX_PROMPT_TOKENS="${MAX_PROMPT_TOKENS:-2048}"          # Table 5
    MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-2048}"                # Table 5
    EVAL_MAX_NEW_TOKENS="${EVAL_MAX_NEW_TOKENS:-2048}"      # paper silent: the training budget
    SYSTEM_PROMPT="${SYSTEM_PROMPT:-general}"               # the paper-era HelpSteer launcher (SYSTEM_PROMPT general)
    ORACLE="${ORACLE:-0}"                                   # Fig. 6 has no oracle line; ORACLE=1 adds it
    EVAL_EVERY="${EVAL_EVERY:-96}"                          # paper silent: every 3 updates
    DATA_DIR="${DATA_DIR:-$REPO_ROOT/data/helpsteer_prompts}"     # prepare_data_helpsteer.sh
    if [[ "$DRY_RUN" != 1 ]]; then
      sdpo_require ANTHROPIC_API_KEY "Fig. 6 has Claude Haiku 4.5 as user and judge: set it in the environment or .env."
    fi
    ;;
  *) echo "error: unknown FIGURE=$FIGURE (use fig4, fig5 or fig6)" >&2; exit 1 ;;
esac

LR="${LR:-5e-6}"                    # Table 5, both settings
TEMPERATURE="${TEMPERATURE:-1.0}"   # Table 5, training and evaluation
EVAL_N="${EVAL_N:-256}"             # App. D.3: 256 held-out prompts (Fig. 6's error bars are s.e. over them)
LOSS_MODE="${LOSS_MODE:-simple_signal}"   # §3: the experiments use the sampled-token policy-gradient form
SEED="${SEED:-1234}"                # paper silent: eval_online_sdpo.sh's seed
REPORT_TO="${REPORT_TO:-none}"
RUN_NAME="${RUN_NAME:-paper_$FIGURE}"
RUN_ID="${RUN_ID:-$FIGURE-$(date +%Y%m%d-%H%M%S)}"
OUTPUT_DIR="${OUTPUT_DIR:-$BASE_WORK/reproduce-paper/$RUN_ID}"

cmd=("$PYTHON" eval_online_sdpo.py
  --model "$MODEL" --lr "$LR" --optim "$OPTIM" --loss_mode "$LOSS_MODE" --temperature "$TEMPERATURE"
  --interactions_per_step "$INTERACTIONS_PER_STEP"
  --max_prompt_tokens "$MAX_PROMPT_TOKENS" --max_new_tokens "$MAX_NEW_TOKENS"
  --eval_max_new_tokens "$EVAL_MAX_NEW_TOKENS"
  --system_prompt "$SYSTEM_PROMPT"
  --train_jsonl "$DATA_DIR/train.jsonl" --val_jsonl "$DATA_DIR/validation.jsonl"
  --train_n "$TRAIN_N" --eval_n "$EVAL_N" --eval_every "$EVAL_EVERY" --seed "$SEED"
  --out_dir "$OUTPUT_DIR" --run_name "$RUN_NAME" --report_to "$REPORT_TO"
  # Paper silent on LoRA: the reference launcher's LoRA (r 256, alpha 512) with the policy generating on vLLM.
  --use_lora --use_vllm --debug_first_example)
if [[ -n "$STYLE_SCHEDULE" ]]; then
  cmd+=(--style_schedule "$STYLE_SCHEDULE")
else
  cmd+=(--style "$STYLE")
fi
if [[ "$ORACLE" == 1 ]]; then
  cmd+=(--oracle)
fi
if [[ "$FIGURE" == fig6 ]]; then
  cmd+=(--user_backend anthropic --judge_backend anthropic --judge_model "$JUDGE_MODEL")
else
  cmd+=(--user_model_name_or_path "$USER_MODEL" --judge_local --user_vllm --user_vllm_gpu_start "$USER_VLLM_GPU_START")
fi

echo "[reproduce_paper] $(date '+%F %T') $FIGURE: model=$MODEL styles=${STYLE_SCHEDULE:-$STYLE}" \
  "batch=$INTERACTIONS_PER_STEP train_n=$TRAIN_N out=$OUTPUT_DIR" >&2
sdpo_mkdir "$OUTPUT_DIR"
sdpo_run "${cmd[@]}" "${SDPO_ARGS[@]}"
