#!/usr/bin/env bash
# Issue 16's check on a CUDA machine, in about 10 minutes (an H200 with 16 cores):
#   1. install  the GPU build: MDS_GPU=1 scripts/bootstrap.sh (onnxruntime-gpu, CUDA 13 and cuDNN 9 from their
#               wheels) into $MDS_VENV (default $MDS_CACHE/venv), and pytest;
#   2. probe    nvidia-smi, and which providers onnxruntime has and starts;
#   3. tests    the GPU-marked tests: pytest -m gpu tests/test_gpu.py;
#   4. bench    bench/gpu.py: workload (c) in-process and through MDS on CUDA, and MDS on the CPU.
# Each step is time-boxed; its output goes to $OUT/STEP.log and its exit status and seconds to $OUT/steps.tsv
# (124: out of time). A failed step is recorded and the next one runs anyway; the script exits 1 when any
# failed. GPU_STEPS picks some of them (e.g. GPU_STEPS="probe bench"). $OUT (default bench/results/gpu) also
# gets the bench's results.json, results.md and servers' logs; GPU_BENCH_ARGS go to bench/gpu.py.
#
# Packages come from PyPI, or from a folder of wheels where the machine reaches no index: set
# WHEELHOUSE=/path/to/wheels (pip then runs with --no-index --find-links; fill it on a machine with the same
# Python: pip download -d DIR setuptools '.[dev,rest,gpu,test]', and rapidocr-onnxruntime==1.4.4 --no-deps).
# Offline, the load generator ghz must be in $MDS_CACHE/bin already (or named by GHZ=/path/to/ghz), and the
# PP-OCR detector in $MDS_CACHE/bench-models or its wheel in the wheelhouse; the ResNet-sized model is generated.
#
#   bash bench/gpu_device.sh                                     # after MDS_GPU=1 make install-test, or not
#   GPU_BENCH_ARGS="--providers tensorrt,cuda,cpu --models resnet" GPU_STEPS=bench bash bench/gpu_device.sh
#   OUT=/tmp/gpu MDS_VENV=/tmp/gpuvenv GPU_STEPS="probe tests bench" GPU_BENCH_ARGS="--duration 3" \
#     bash bench/gpu_device.sh                     # a rehearsal where no GPU is: the CUDA rows fall back to cpu
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export MDS_CACHE=${MDS_CACHE:-$HOME/.cache/mds}
export MDS_VENV=${MDS_VENV:-$MDS_CACHE/venv}
export OUT=${OUT:-$repo/bench/results/gpu}
export PYTHONPATH=$repo:$repo/gen
python=$MDS_VENV/bin/python
if [ -n "${WHEELHOUSE:-}" ]; then
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=$WHEELHOUSE  # every pip below, bootstrap's and the model download's too
fi
cd "$repo"

case "${1:-}" in
  install)  # the steps' commands, each run in a time box by the loop below
    MDS_GPU=1 scripts/bootstrap.sh || exit
    # pytest and what tests/test_gpu.py imports, at pyproject.toml's pins (the test extra would bring onnxruntime)
    pins=$(grep -oE '"(pytest|pytest-asyncio|pytest-timeout|requests)==[^"]+"' pyproject.toml | tr -d '"')
    # shellcheck disable=SC2086
    exec "$MDS_VENV/bin/pip" install --quiet $pins ;;
  probe)
    nvidia-smi || echo "no nvidia-smi"
    "$python" -c '
import sys
sys.path[:0] = ["bench", "scripts"]
import onnxruntime as ort
from models import mlp
from mds_grpc.core.runtime import available_providers
print("onnxruntime", ort.__version__, ort.get_device(), "providers:", ", ".join(available_providers()))
ort.preload_dlls()
session = ort.InferenceSession(mlp(), providers=["CUDAExecutionProvider"])
print("a CUDA session runs on", session.get_providers()[0])
sys.exit(session.get_providers()[0] != "CUDAExecutionProvider")'
    exit ;;
  tests)
    exec "$python" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --timeout 120 --junitxml="$OUT/tests.xml" ;;
  bench)
    # shellcheck disable=SC2086
    exec "$python" bench/gpu.py --out "$OUT" ${GPU_BENCH_ARGS:-} ;;
  "") ;;
  *) echo "usage: bash bench/gpu_device.sh" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
if [ ! -x "$MDS_CACHE/bin/ghz" ] && [ -n "${GHZ:-}" ]; then install -D "$GHZ" "$MDS_CACHE/bin/ghz"; fi
printf 'step\texit\tseconds\n' >"$OUT/steps.tsv"
failed=0
declare -A limits=([install]=150 [probe]=30 [tests]=120 [bench]=240)  # seconds: 9 minutes in all at most
for name in ${GPU_STEPS:-install probe tests bench}; do
  limit=${limits[$name]:?unknown step $name} start=$SECONDS rc=0
  echo "== $name (at most $limit s): $OUT/$name.log"
  timeout --kill-after=5 "$limit" bash "$repo/bench/gpu_device.sh" "$name" >"$OUT/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$OUT/steps.tsv"
  if [ "$rc" != 0 ]; then
    failed=1
    echo "   failed with exit status $rc$([ "$rc" = 124 ] && echo ' (out of time)'); its last lines:"
    tail -n 8 "$OUT/$name.log" | sed 's/^/   /'
  fi
done
cat "$OUT/steps.tsv"
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
exit "$failed"
