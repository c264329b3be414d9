#!/usr/bin/env bash
# The CUDA path, measured in one go on a GPU machine (issue #24): under 8 minutes on one H100.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu-check-out
#
# Runs from the repository root with the machine's own python3 (PyTorch with CUDA, typer, rich,
# pillow, matplotlib, pandas, pytest; nothing is installed or downloaded):
#   1. builds the native ops with their CUDA kernels (`dcn_inspect doctor`), for this GPU only;
#   2. the CUDA tests (every op against the reference, gradcheck, half precision, and
#      torchvision's CUDA deform_conv2d where it imports);
#   3. bench/cuda_compare.py: our CUDA deform_conv2d against torchvision's, forward and
#      forward+backward, S1/S2/S3, v1 and v2, float32 and float16;
#   4. bench/scale.py on the GPU: dilation-stats seconds per image and receptive-field seconds
#      per unit (with and without the saliency search) on resnet50-dcn-mmdet at 800x1333.
# Every step writes its log to OUT_DIR; a failing step is reported and the next one still runs.
# The exit status is the number of failed steps.
set -u
OUT_DIR=${1:-gpu-check-out}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DCN_INSPECT_BUILD_DIR=${DCN_INSPECT_BUILD_DIR:-${TMPDIR:-/tmp}/dcn-inspect-ops-gpu}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # this GPU only: a build for every arch takes minutes
  TORCH_CUDA_ARCH_LIST=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST
fi
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  if timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED (status $?) after $((SECONDS - start)) s; last lines:"
    tail -n 15 "$OUT_DIR/$name.log" | sed 's/^/   | /'
    failed=$((failed + 1))
  fi
  tail -n 40 "$OUT_DIR/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  git log -1 --format='commit %h %cd' 2>/dev/null || true
} | tee "$OUT_DIR/machine.txt"

step build 180 $PY -m dcn_inspect doctor
step cuda_tests 100 $PY -m pytest -q -p no:cacheprovider cli_tests/ops/test_ops_cuda.py \
  cli_tests/ops/test_ops_fuzz.py -k cuda
step cuda_compare 45 $PY bench/cuda_compare.py --shapes S1 S2 S3 --json "$OUT_DIR/cuda_compare.json"
step cuda_compare_fp16 35 $PY bench/cuda_compare.py --shapes S1 S2 S3 --dtype float16 \
  --json "$OUT_DIR/cuda_compare_fp16.json"
step scale 110 $PY bench/scale.py --device cuda --procs 1 --images 8 24 --units 4 12 \
  --json "$OUT_DIR/scale.json"
echo "gpu_check: $failed step(s) failed; logs in $OUT_DIR/"
exit "$failed"
