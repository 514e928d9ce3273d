#!/usr/bin/env bash
# The static GPU check (python -m lash_kernels.aot_check --full, empty allow-list) against every
# Triton release that a torch in pyproject.toml's range pulls: torch 2.11 → 3.6.0, 2.12.0 → 3.7.0,
# 2.12.1 → 3.7.1, 2.14 → ~3.8.0, 2.15 → ~3.9.0 (from each wheel's requirements). Each release is
# installed beside the venv's torch, into a folder of its own put first on PYTHONPATH. With the
# newest release the kernel tests run again under its interpreter: a CPU build of torch pulls no
# Triton, so a user who installs one first (README, "Without a GPU") tests with the newest release.
set -euo pipefail
work=${1:-$(mktemp -d)}
for version in 3.6.0 3.7.0 3.7.1 3.8.0 3.9.0; do
    target="$work/triton-$version"
    pip install -q --no-deps --target "$target" "triton==$version"
    echo "static check, triton $version:"
    PYTHONPATH="$target" python -m lash_kernels.aot_check --full
done
echo "kernel tests under the interpreter, triton $version:"
PYTHONPATH="$target" python -m pytest -q -n auto -p no:cacheprovider tests/lash_kernels/ops
