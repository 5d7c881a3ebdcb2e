#!/usr/bin/env bash
# Run the test suite on CPU, installing what it needs on first use.
#   ./scripts/test.sh                 # whole suite
#   ./scripts/test.sh -k losses -x    # extra arguments go to pytest
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO_ROOT/scripts/setup_env.sh"
cd "$REPO_ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
exec "${SDPO_VENV:-$REPO_ROOT/.venv}/bin/python" -m pytest -q "$@"
