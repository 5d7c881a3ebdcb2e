#!/usr/bin/env bash
# Check, from package metadata only (seconds, no wheels downloaded), that the GPU install resolves:
# requirements-gpu.txt (base + vLLM + DeepSpeed) for Python 3.11 and 3.12 on x86_64 Linux.
#   .ci/check_gpu_requirements.sh            # prints the pinned versions of the key packages
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet uv==0.13.9 2> >(grep -v "is ignored: it is neither" >&2)
for version in 3.11 3.12; do
  # PyPI's metadata only: the machine's local wheel folders would answer for CPU builds.
  UV_NO_CONFIG=1 PIP_FIND_LINKS= "$tools/venv/bin/uv" pip compile requirements-gpu.txt --quiet --no-header \
    --python-version "$version" --python-platform x86_64-manylinux_2_28 --output-file "$tools/gpu-$version.txt"
  echo "GPU set resolves for Python $version: $(grep -E '^(torch|vllm|transformers|numpy|deepspeed|trl)==' "$tools/gpu-$version.txt" | tr '\n' ' ')"
done
