#!/usr/bin/env bash
# The GPU checks the fused kernels (issue 5) still owe, as one script for a session that has a GPU:
#
#   bash bench/gpu_check.sh        # from the repo root; results under $OUT (default out/gpu_check)
#
# 1. device.txt    nvidia-smi, torch/triton versions, the device torch sees
# 2. gpu_tests.txt the tests marked gpu: fused ops vs reference on Llama shapes, forward and
#                  gradients; NF4 dequant bit-identical; a fused tiny Llama trains like the unfused one
# 3. bench.txt     bench/bench_nf4_lora_linear.py on Llama shapes (bench.json: the same rows),
#                  ending with the config autotuning chose per shape (the config comments'
#                  owed measurements)
# 4. bench_multi_adapter.txt  mixed-adapter batches (Triton multi_lora) vs looping, vs PEFT
# Without CUDA it degrades to a smoke check of the script itself: the gpu tests skip and the
# bench runs --small on CPU. Exit status 1 if any step failed; a summary goes to stdout.
# Budget: one device call (≤ 600 s): tests ≤ 200 s, bench ≤ 270 s, multi-adapter bench ≤ 100 s
# (autotuning compiles ~6 configs per kernel variant on first use); each step has its timeout
# so one hang cannot eat the session's 15 device minutes. On the lent device machine run it as
#   run(command="bash bench/gpu_check.sh", timeout_s=600)
# Its python3 has torch, triton, transformers, peft and pytest (no internet, no bitsandbytes:
# PEFT+bnb rows are left out unless a bitsandbytes wheel is carried, see the device README);
# lorafx itself is installed there below with pip -e, offline.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
# The pytest script, not `python -m pytest`: from the repo root, -m would put the top-level
# kernels/ folder on sys.path, where it shadows the PyPI package of that name.
PYTEST="$(dirname "$PYTHON")/pytest"
[ -x "$PYTEST" ] || PYTEST=pytest
status=0
"$PYTHON" -c 'import lorafx' 2>/dev/null ||
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.txt" 2>&1 || status=1

{
    nvidia-smi || echo "nvidia-smi: not available"
    "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__,
"| cuda:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
} >"$OUT/device.txt" 2>&1

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    bench_args=(--json "$OUT/bench.json")
else
    echo "no CUDA: smoke check only (gpu tests skip, bench --small on CPU)"
    bench_args=(--small --json "$OUT/bench.json")
fi

tests=(tests/kernels/test_nf4_lora_linear.py tests/kernels/test_lora_linear.py tests/passes/test_fuse_nf4_lora.py
       tests/kernels/test_multi_lora.py)
timeout 200 "$PYTEST" -q -p no:logging -rs -m gpu "${tests[@]}" >"$OUT/gpu_tests.txt" 2>&1 || status=1
echo "gpu tests: $(tail -n 1 "$OUT/gpu_tests.txt")"

timeout 270 "$PYTHON" bench/bench_nf4_lora_linear.py "${bench_args[@]}" >"$OUT/bench.txt" 2>&1 || status=1
echo "bench: $(grep -c '^| ' "$OUT/bench.txt") table lines in $OUT/bench.txt"

small=(); [ "${bench_args[0]}" = --small ] && small=(--small)
timeout 100 "$PYTHON" bench/bench_multi_adapter.py "${small[@]}" >"$OUT/bench_multi_adapter.txt" 2>&1 || status=1
echo "bench_multi_adapter: $(grep -c '^| ' "$OUT/bench_multi_adapter.txt") table lines"

[ "$status" = 0 ] && echo "gpu_check: OK ($OUT)" || echo "gpu_check: FAILED, see $OUT"
exit "$status"
