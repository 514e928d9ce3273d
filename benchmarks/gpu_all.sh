#!/usr/bin/env bash
# What LASH checks on a CUDA machine, each step time-boxed so that a short lease still returns
# the earlier steps: at most 9 minutes by default (tests 120 s, decode 120 s, suite 165 + 45 s,
# e2e 90 s), under a device call's 10. Writes at most 8 files under OUT_DIR.
#
#   bash benchmarks/gpu_all.sh OUT_DIR              # tests decode suite e2e, in this order
#   bash benchmarks/gpu_all.sh OUT_DIR decode e2e   # only these steps (a rerun of what a lease cut)
#   bash benchmarks/gpu_all.sh OUT_DIR hf           # the Hugging Face benchmarks (80 s), on their own
#
# Steps: tests (the gpu-marked tests: a figure from a broken kernel is worth nothing), decode
# (early-exit and speculative decoding), suite (kernels, loss, routing, training step; then the
# norm and RoPE rows again), e2e (the short ASHEM run end to end), hf (Hugging Face memory and
# RoPE, measured on the H200 in 2026-11; no open bar needs them, so they are not a default step).
# Liger-Kernel and Cut Cross-Entropy are compared when importable (README, "Running the GPU suite").
set -u
out=${1:?usage: bash benchmarks/gpu_all.sh OUT_DIR [tests|decode|suite|e2e|hf ...]}
shift
steps=${*:-tests decode suite e2e}
for step in $steps; do
    case $step in tests | decode | suite | e2e | hf) ;; *) echo "unknown step: $step (tests, decode, suite, e2e, hf)" >&2; exit 2 ;; esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
# Where the README's wheel install puts Liger-Kernel and Cut Cross-Entropy; without them their rows are SKIPPED.
if [ -d /tmp/site ]; then PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__)"
    date -u
} >"$out/env.txt" 2>&1

tests() {
    local workers
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
    # A test module whose optional import is missing on this machine must not stop the CUDA tests.
    # SIGINT at the time box: pytest then still prints the failures so far and the slowest tests.
    # Four workers share the 16 cores, so each compiles with four threads.
    LASH_KERNELS=triton TORCHINDUCTOR_COMPILE_THREADS=4 timeout -s INT -k 15 120 python3 -m pytest -q -m gpu \
        -p no:cacheprovider --continue-on-collection-errors --durations=15 $workers tests/ >"$out/gpu_tests.txt" 2>&1
    tail -n 25 "$out/gpu_tests.txt"
}

decode() {
    # The benchmark's early-exit model, trained as on the CPU (1000 bf16 steps; one checkpoint, at the
    # end: nothing the machine keeps outlives the lease), then plain / early exit / speculative
    # decoding, then the Hugging Face Llama against model.generate; rows print as they finish, so a
    # cut run keeps them.
    timeout 120 python3 benchmarks/decode_bench.py --repeats 2 --eval-every 1000 >"$out/decode.txt" 2>&1
    tail -n 40 "$out/decode.txt"
}

suite() {
    timeout 165 python3 benchmarks/gpu_suite.py --out "$out/suite" --no-tests >"$out/suite.log" 2>&1
    # The norm and RoPE rows once more in a fresh process, each compared with the first run: a row
    # that moves more than 10% between two runs is not settled. Its table goes to the end of
    # suite.log, its files to a scratch folder, so OUT_DIR keeps to 8 files.
    local earlier=()
    if [ -f "$out/suite/gpu_suite.json" ]; then earlier=(--compare "$out/suite/gpu_suite.json"); fi
    timeout 45 python3 benchmarks/gpu_suite.py --out "$(mktemp -d)" --only kernels ${earlier[@]+"${earlier[@]}"} >>"$out/suite.log" 2>&1
    cat "$out/suite/gpu_suite.md" 2>/dev/null
    grep "difference from the earlier run" "$out/suite.log"
}

e2e() {
    # The short ASHEM experiment end to end, capturing and compiling included: LASH's default path against an eager loop.
    timeout 90 python3 benchmarks/e2e_ashem.py --device cuda >"$out/e2e.txt" 2>&1
    tail -n 20 "$out/e2e.txt"
}

hf() {
    {
        for tokens in 1024 8192; do # one logits chunk (256 MiB) holds all 4 × 1024 rows; 8192 tokens take 8
            timeout 30 python3 benchmarks/hf_multi_exit_memory.py --device cuda --tokens $tokens
        done
        timeout 20 python3 benchmarks/hf_rope.py  # its table is its figures
    } >"$out/hf.txt" 2>&1
    tail -n 5 "$out/hf.txt"
}

for step in $steps; do
    echo "== $step"
    $step
done
