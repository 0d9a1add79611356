#!/usr/bin/env bash
# Every GPU measurement issue 13 asks for, in one call on a lent GPU machine (torch + transformers, no Ray, no
# datasets, no package registry). About 8-10 minutes on an H100/H200.
#
# On the development machine first (the GPU machine reaches no registry; the wheel travels in the working tree):
#   python -m pip download --no-deps -d benchmarks/vendor liger-kernel
# then with the device tool, from the repository root:
#   bash benchmarks/gpu_check.sh            (writes its logs to $OUT, or /tmp/gpu-check)
# Results go to benchmarks/RESULTS.md with the device name, date and commit.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch, transformers; \
print('torch', torch.__version__, 'transformers', transformers.__version__)"; git rev-parse HEAD 2>/dev/null; date -u
} > "$OUT/env.txt" 2>&1
if ls benchmarks/vendor/liger_kernel-*.whl > /dev/null 2>&1; then
  python -m pip install --no-index --no-deps --target "$OUT/site" benchmarks/vendor/liger_kernel-*.whl \
    > "$OUT/liger-install.txt" 2>&1 && export PYTHONPATH=$PWD:$OUT/site
fi
run() {  # name, then bench_loop arguments; a failure is logged and the next measurement still runs
  local name=$1; shift
  timeout 240 python benchmarks/bench_loop.py --device cuda "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $?" >> "$OUT/status.txt"
}
# the chunked loss against HF's on the GPU (bf16 autocast), the CPU tests run here in CI
timeout 120 python -m pytest -q tests/test_loss.py -p no:cacheprovider > "$OUT/test_loss.txt" 2>&1
echo "test_loss: exit $?" >> "$OUT/status.txt"
run gpt2-124m --model gpt2-124m --compile --rounds 2
run llama-1.1b --model llama-1.1b --compile --loss-impl auto --rounds 2
run llama-3.2-1b-chunked --model llama-3.2-1b --compile --loss-impl chunked
run llama-3.2-1b-auto --model llama-3.2-1b --compile --loss-impl auto
tail -n 3 "$OUT"/*.txt
