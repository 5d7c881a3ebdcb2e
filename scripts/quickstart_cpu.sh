#!/usr/bin/env bash
# The main job on a fresh machine, CPU only, no keys, no network: installs what it needs (once), prepares
# the bundled MT-Bench prompts, then runs online SDPO on the embedded SmolLM2-135M-Instruct with a
# rule-based simulated user and judge (PRESET=cpu of scripts/eval_online_sdpo.sh). About 5 minutes on 2 cores.
#
#   ./scripts/quickstart_cpu.sh
#   TRAIN_N=8 STYLE=no_lists ./scripts/quickstart_cpu.sh --eval_every 2     # env vars and extra args as in eval_online_sdpo.sh
# Two jobs on one machine: give each its share of the cores (OMP_NUM_THREADS=1 each on 2 cores); with
# default threads each spins on every core and both run several times slower.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && dry_run=1; done
if [[ -z "${dry_run:-}" ]]; then
  "$REPO_ROOT/scripts/setup_env.sh"
  # The venv just set up, unless the user chose an interpreter (PYTHON or an active virtualenv).
  [[ -n "${PYTHON:-}${VIRTUAL_ENV:-}" ]] || export PYTHON="${SDPO_VENV:-$REPO_ROOT/.venv}/bin/python"
  if [[ ! -f "$REPO_ROOT/data/mtbench_prompts/validation.jsonl" ]]; then
    "$REPO_ROOT/scripts/prepare_data_mtbench.sh"
  fi
fi
PRESET=cpu exec "$REPO_ROOT/scripts/eval_online_sdpo.sh" "$@"
