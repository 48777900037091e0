# Source this on a GPU machine (the device tool's H100/H200) from the repository root:
#     . .ci/gpu_session.sh && python -m pytest -q -m cuda tests && python bench/kernels.py --device cuda
# It installs the wheels carried in .whl/ (lapx, pycocotools, torch-linear-assignment for
# Python 3.12; download them here with `pip download --python-version 3.12 ...`), builds the
# extension for sm_90 only, writes the build log to $OUT (when set) and prints the backends.
# To compare with the official Deformable-DETR kernel, place its public source in the ignored
# bench/_anchors/Deformable-DETR and run `bash bench/build_official_msda.sh` afterwards.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export DETRKD_CUDA_ARCH=90 MAX_JOBS=${MAX_JOBS:-16}
( time python3 setup.py -q build_ext --inplace ) > "${OUT:-/tmp}/build.log" 2>&1
tail -3 "${OUT:-/tmp}/build.log"
python3 -m common.ops
