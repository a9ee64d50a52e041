#!/usr/bin/env bash
# One-call GPU check for a lent machine without network access. Reports onnxruntime's providers
# and, where CUDA is available, parity (CUDA fp32, TF32 and fp16 vs CPU fp32, multi-cotangent vs
# single) and timings, plus torch CUDA autograd where torch imports. Results:
# bench/results/gpu_check.json (under $OUT as well when $OUT is set). Extra arguments go to
# bench/gpu_check.py (models, --weights DIR, --photos DIR, --repeats N).
#
# What it needs on that machine (nothing is downloaded):
#   - a Python with numpy, onnx, onnxruntime-gpu, Pillow, xarray (the runtime's dependencies):
#     $PY if set, else .venv/gpu/bin/python, .venv/runtime/bin/python, python3, the first that
#     imports onnxruntime; $ORT_SITE, a folder holding an unpacked onnxruntime-gpu, goes first on
#     PYTHONPATH; or wheels in $WHEELS (a carried folder) installed offline into a fresh
#     venv at .venv/gpu: pip install --no-index --find-links "$WHEELS" onnxruntime-gpu numpy onnx ...
#   - CUDA 13 and cuDNN 9 libraries: the system's, or those of the nvidia-* pip packages that torch
#     brings (found below and put on LD_LIBRARY_PATH).
#   - models: build/bench/*.onnx (made by `make bench`; carry build/bench, about 170 MB for all
#     four backbones, or only the small ones: mobilenet_v2 9 MB, alexnet 10 MB) or paths as arguments.
#   - optional: torch + torchvision with CUDA for the torch baseline.
# Usage: bench/gpu_check.sh [MODEL.onnx ...]
set -u
cd "$(dirname "$0")/.."

if [ -n "${WHEELS:-}" ] && [ ! -x .venv/gpu/bin/python ]; then
  python3 -m venv .venv/gpu && .venv/gpu/bin/python -m pip install -q --no-index --find-links "$WHEELS" \
    onnxruntime-gpu numpy onnx pillow xarray h5netcdf typer tqdm \
    || echo "gpu_check: offline install from $WHEELS failed; trying other interpreters" >&2
fi

if [ -n "${ORT_SITE:-}" ]; then
  export PYTHONPATH="$ORT_SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

choose_python() {
  for cand in "${PY:-}" .venv/gpu/bin/python .venv/runtime/bin/python python3; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
    if "$cand" -c 'import onnxruntime, numpy, onnx' >/dev/null 2>&1; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

echo "== machine"
uname -a
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  || echo "nvidia-smi: not found"

if ! PYBIN=$(choose_python); then
  echo "gpu_check: no Python here imports onnxruntime, numpy and onnx; set PY=... or WHEELS=..." >&2
  exit 2
fi
echo "== python: $PYBIN"
# The CUDA provider links libcudart/libcublas/libcurand/libcufft and loads cuDNN by name: put the
# folders of pip-installed NVIDIA libraries on the loader's path.
nvlibs=$("$PYBIN" - <<'PYEOF' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = {os.path.dirname(f) for r in roots for pat in ("nvidia/*/lib/lib*.so*", "nvidia/*/*/lib/lib*.so*")
        for f in glob.glob(os.path.join(r, pat))}
print(":".join(sorted(dirs)))
PYEOF
)
if [ -n "$nvlibs" ]; then
  export LD_LIBRARY_PATH="$nvlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "== NVIDIA pip libraries: $(echo "$nvlibs" | tr ':' '\n' | wc -l) folders on LD_LIBRARY_PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYBIN" bench/gpu_check.py "$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -f bench/results/gpu_check.json ]; then
  cp bench/results/gpu_check.json bench/results/gpu_check.md "$OUT/" 2>/dev/null || true
fi
exit $rc
