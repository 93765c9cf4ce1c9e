#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs on a GPU machine that has PyTorch but not our other
# dependencies (pydantic for the config), downloaded here into .whl/ (git-ignored) to be copied along
# with the working tree. gpu_check.py unpacks them itself when pydantic is missing.
# Usage: bash benchmarks/gpu_check_wheels.sh [python version of the GPU machine, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
pins=$(grep -E '^(pydantic|pydantic_core|annotated-types|typing-inspection|typing_extensions)==' constraints.txt)
mkdir -p .whl
for pin in $pins; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pin"
done
ls -l .whl
