"""Builds the extension ``common._C`` from ``csrc/``.

    python setup.py build_ext --inplace

CPU kernels are always built. CUDA kernels are added whenever a CUDA toolkit (nvcc) and a
CUDA-enabled torch are present, for sm_80 and sm_90 (plus PTX for newer GPUs). Environment:

    DETRKD_NO_CUDA=1            build the CPU kernels only
    DETRKD_CUDA_ARCH="90"       override the CUDA architectures (semicolon-separated, e.g. "80;90")
    DETRKD_PORTABLE=1           do not compile the CPU kernels for the build machine's own
                                instruction set (-march=native); use for wheels that travel
    MAX_JOBS=N                  parallel compile jobs (ninja)
"""
import glob
import os

from setuptools import setup

# torch derives CUDA_HOME from the first nvcc on PATH; a wrapper script in /usr/local/bin would
# make that /usr/local. Prefer the standard toolkit location when nothing is set.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and \
        os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted():
    if os.environ.get("DETRKD_NO_CUDA", "0") not in ("", "0"):
        return False, "DETRKD_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (CUDA_HOME / nvcc)"
    return True, f"CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def gencode_flags():
    archs = os.environ.get("DETRKD_CUDA_ARCH", "80;90").replace(",", ";").split(";")
    archs = [a.strip().replace(".", "") for a in archs if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=int)
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")  # PTX for newer GPUs
    return flags


def make_extension():
    use_cuda, why = cuda_wanted()
    print(f"[detrkd] building common._C with{'' if use_cuda else 'out'} CUDA kernels: {why}")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]
    if os.environ.get("DETRKD_PORTABLE", "0") in ("", "0"):
        cxx.append("-march=native")
    if not use_cuda:
        return CppExtension("common._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + gencode_flags()
    return CUDAExtension("common._C", sources, define_macros=[("WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


setup(
    name="detrkd",
    version="0.1.0",
    description="Knowledge distillation for DETR detectors, with fast deformable-attention and matching ops",
    packages=["common"],
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
