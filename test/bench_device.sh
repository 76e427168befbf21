#!/usr/bin/env bash
# One-shot accelerator bench (no download, no project requirement beyond torch, torchvision, numpy, pillow, tqdm,
# pyyaml).
# Generates the synthetic data set on this machine, then runs every stage of bench.py once and prints the table:
#   NVIDIA GPU: bench.py --device cuda --preset device --gpu-augment (256x128; fp32/bf16/fp16 channels-last;
#               the bf16 step captured in one CUDA graph at 16x4, 32x4 and 64x4 images; bf16 compiled; a 64x4
#               eager batch; loader with all cores; end to end with the CPU loader, with decoding + augmentation
#               on the GPU, and with both and the CUDA-graphed step; feature extraction with the CPU loader and
#               with decoding on the GPU; the evaluator)
#               First, on a GPU, the CUDA-only tests (test_cuda_graph.py, test_device_eval.py: the graphed step
#               trains exactly like the eager one; nvjpeg batches): gpu_tests.log, within the same time limit
#               (GPU_TESTS=0 skips them).
#   no GPU:     says that it FELL BACK and runs the CPU preset instead.
# Writes bench_device.json, bench_device.log (stdout) and bench_device.err (progress bars, errors) to $OUT when
# it is set, else to test/output/bench/. Extra arguments go to bench.py (e.g. --tiny, --threads 1).
#   bash test/bench_device.sh
#   OUT=/tmp/out bash test/bench_device.sh --compile-dtypes bf16 fp16
set -u
test_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root_dir=$(dirname "$test_dir")
PYTHON=${PYTHON:-$( [ -x "$root_dir/.venv/bin/python" ] && echo "$root_dir/.venv/bin/python" || echo python3 )}
LIMIT_S=${LIMIT_S:-450}  # stop (SIGINT) within an 8-minute slot (+30 s to exit); the JSON keeps every finished stage
out_dir=${OUT:-$test_dir/output/bench}
mkdir -p "$out_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$root_dir" || exit 1

if ! "$PYTHON" -c "import torch, torchvision, numpy, PIL, tqdm, yaml" 2>"$work/import.err"; then
  cat "$work/import.err" >&2
  echo "error: $PYTHON lacks one of torch, torchvision, numpy, pillow, tqdm, pyyaml (the only packages this needs)" >&2
  exit 2
fi
gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -n "$gpu" ]; then
  echo "GPU: $gpu"
  bench_args=(--device cuda --preset device --gpu-augment)
  note="GPU run: $gpu"
else
  echo "FELL BACK TO THE CPU: torch sees no CUDA GPU here; running the CPU preset" \
       "(the GPU figures are still to be measured)"
  bench_args=(--device cpu --preset cpu)
  note="CPU fallback: no CUDA GPU visible, GPU figures still to be measured"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /'

start=$(date +%s)
tests_status=0
if [ -n "$gpu" ] && [ "${GPU_TESTS:-1}" = 1 ]; then  # CI has no GPU: these tests run here or nowhere
  timeout 90 "$PYTHON" -m pytest -q -p no:cacheprovider -rs test/test_cuda_graph.py test/test_device_eval.py \
    >"$out_dir/gpu_tests.log" 2>&1
  tests_status=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$out_dir/gpu_tests.log" | sed 's/^/GPU tests: /'
  [ "$tests_status" -eq 0 ] || echo "GPU tests: exit $tests_status; see $out_dir/gpu_tests.log" >&2
fi
LIMIT_S=$(( LIMIT_S - ($(date +%s) - start) ))
timeout --signal=INT --kill-after=30 "$LIMIT_S" \
  "$PYTHON" bench.py "${bench_args[@]}" --data "$work/synthetic" --json "$out_dir/bench_device.json" --note "$note" "$@" \
  2>"$out_dir/bench_device.err" | tee "$out_dir/bench_device.log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  tail -n 20 "$out_dir/bench_device.err" >&2
  if [ "$status" -eq 124 ] || [ "$status" -eq 130 ]; then
    echo "error: stopped after ${LIMIT_S} s; the finished stages are in $out_dir/bench_device.json" >&2
  fi
  echo "error: bench.py exited with $status; stderr: $out_dir/bench_device.err" >&2
  exit "$status"
fi
echo "bench_device.sh: $(( $(date +%s) - start )) s; JSON $out_dir/bench_device.json, log $out_dir/bench_device.log"
[ "$tests_status" -eq 0 ] || exit 3
