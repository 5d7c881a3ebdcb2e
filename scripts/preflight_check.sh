#!/usr/bin/env bash
# Pre-flight learnability check only (eval_online_sdpo.py --preflight N --preflight_only): on N training prompts,
# does the hindsight teacher (x⊕o) answer better than the policy, and do the user's follow-ups move token
# log-probs more than an unrelated one? One verdict line per user style; nothing is trained.
#
#   PRESET=cpu ./scripts/preflight_check.sh       # the embedded SmolLM2-135M, rule-based user and judge (CPU)
#   N=32 MODEL=Qwen/Qwen3-4B STYLE=concise_casual_beginner DATA_DIR=./data/tldr_prompts_unique SYSTEM_PROMPT=tldr \
#     ./scripts/preflight_check.sh               # before a GPU run: the same settings as eval_online_sdpo.sh
#   ./scripts/preflight_check.sh --dry-run        # print the command
#
# Env: N (16) training prompts to check; every other variable and argument is eval_online_sdpo.sh's.
exec "$(dirname "${BASH_SOURCE[0]}")/eval_online_sdpo.sh" --preflight "${N:-16}" --preflight_only "$@"
