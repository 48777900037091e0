#!/usr/bin/env bash
# Build the official Deformable-DETR multi-scale deformable attention op, the GPU anchor that
# bench/kernels.py compares our kernel against (what most DETR codebases still compile and ship).
#
# Their code is never committed here. Place a copy of the public repository
# (github.com/fundamentalvision/Deformable-DETR) in the git-ignored folder
#     bench/_anchors/Deformable-DETR
# and this script edits THAT copy so it compiles against current PyTorch, then builds
# models/ops in place. bench/kernels.py picks the built module up from there when it exists.
#
# The source predates PyTorch 1.11 and needs the usual edits:
#   tensor.type().is_cuda()          -> tensor.is_cuda()
#   tensor.data<T>()                 -> tensor.data_ptr<T>()
#   AT_DISPATCH_...(value.type(),..) -> AT_DISPATCH_...(value.scalar_type(),..)
#   #include <THC/THCAtomics.cuh>    -> #include <ATen/cuda/Atomic.cuh>   (THC is gone)
#   AT_ASSERTM / AT_ERROR            -> TORCH_CHECK                        (deprecated macros)
# and its setup.py refuses to build unless torch.cuda.is_available(); FORCE_CUDA=1 lets it
# compile on a machine with the CUDA toolkit but no GPU (useful to check the build only).
# The edits are idempotent: running the script twice is harmless.
#
# Usage:  bash bench/build_official_msda.sh            (from anywhere)
# Environment:
#   TORCH_CUDA_ARCH_LIST  GPU architectures to build for (default "9.0", the H100)
#   MAX_JOBS              parallel compile jobs (default 2)
#   CUDA_HOME             CUDA toolkit (default /usr/local/cuda when it exists)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ops="$here/_anchors/Deformable-DETR/models/ops"
if [[ ! -f "$ops/setup.py" ]]; then
  echo "error: $ops/setup.py not found." >&2
  echo "Place a copy of github.com/fundamentalvision/Deformable-DETR in bench/_anchors/ first," >&2
  echo "e.g.  git clone --depth 1 https://github.com/fundamentalvision/Deformable-DETR bench/_anchors/Deformable-DETR" >&2
  exit 1
fi
if ! git -C "$here/.." check-ignore -q "$ops/setup.py"; then
  echo "error: $ops is not git-ignored; refusing to edit third-party code inside the tracked tree" >&2
  exit 1
fi

cd "$ops"
echo "[build_official_msda] patching $ops for current PyTorch"
sources=$(find src -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')
# shellcheck disable=SC2086
sed -i \
  -e 's/\.type()\.is_cuda()/.is_cuda()/g' \
  -e 's/\.data<\([A-Za-z_0-9:]*\)>()/.data_ptr<\1>()/g' \
  -e 's/\(AT_DISPATCH_[A-Z_]*(\)\([A-Za-z_0-9]*\)\.type()/\1\2.scalar_type()/g' \
  -e 's#<THC/THCAtomics.cuh>#<ATen/cuda/Atomic.cuh>#' \
  -e 's/\bAT_ASSERTM(/TORCH_CHECK(/g' \
  -e 's/\bAT_ERROR(\(.*\));/TORCH_CHECK(false, \1);/g' \
  $sources
# Let the build go ahead without a visible GPU when FORCE_CUDA=1 (toolkit present).
sed -i 's/if torch\.cuda\.is_available() and CUDA_HOME is not None:/if (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1") and CUDA_HOME is not None:/' setup.py

left=$(grep -nE '\.type\(\)|\.data<|THC/|AT_ASSERTM|AT_ERROR' $sources || true)
if [[ -n "$left" ]]; then
  echo "warning: pre-1.11 ATen uses remain (the build may fail):" >&2
  echo "$left" >&2
fi

if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
# Their CPU stub includes ATen/cuda/CUDAContext.h, which needs cusparse.h & co. A toolkit
# without the math libraries' headers can borrow them from torch's pip-installed nvidia wheels.
if [[ -n "${CUDA_HOME:-}" && ! -f "$CUDA_HOME/include/cusparse.h" ]]; then
  extra=$(python - <<'EOF'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for h in glob.glob(os.path.join(sp, "nvidia", "**", "include", "cusparse.h"), recursive=True):
        dirs.add(os.path.dirname(h))
print(":".join(sorted(dirs)))
EOF
)
  if [[ -n "$extra" ]]; then
    echo "[build_official_msda] cusparse.h not in $CUDA_HOME/include; adding $extra to CPATH"
    export CPATH="$extra${CPATH:+:$CPATH}"
  fi
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export FORCE_CUDA=1
echo "[build_official_msda] building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (CUDA_HOME=${CUDA_HOME:-unset})"
python setup.py build_ext --inplace

so=$(ls "$ops"/MultiScaleDeformableAttention*.so 2>/dev/null | head -1)
if [[ -z "$so" ]]; then
  echo "error: the build produced no MultiScaleDeformableAttention*.so in $ops" >&2
  exit 1
fi
echo "[build_official_msda] built $so"
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  (cd "$ops" && python -c "import torch, MultiScaleDeformableAttention as M; print('[build_official_msda] import ok:', M.__file__)")
else
  echo "[build_official_msda] no GPU here: built, not imported (bench/kernels.py --device cuda uses it on a GPU machine)"
fi
