#!/usr/bin/env bash
# Compile ONE .cu file of csrc/ with the flags setup.py uses (sm_80 + sm_90), to check it builds.
# Usage: bash .ci/nvcc_check.sh csrc/foo_cuda.cu   (object goes to /tmp, nothing is linked)
# Quicker than a full build when only one CUDA file changed; CI builds everything.
set -euo pipefail
f=$1
inc=$(CUDA_HOME=/usr/local/cuda python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths(device_type='cuda')))")
py=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CUDA_HOME=/usr/local/cuda /usr/local/cuda/bin/nvcc -c "$f" -o /tmp/$(basename "$f").o $inc -I"$py" -Icsrc -std=c++20 \
  -DWITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
  --expt-relaxed-constexpr -O3 -Xcompiler -fPIC \
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
echo "ok: $f compiles for sm_80 and sm_90"
