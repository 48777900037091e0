"""Builds the extension ``common._C`` from ``csrc/``.

    python setup.py build_ext --inplace

CPU kernels are always built. CUDA kernels are added when a GPU is visible and a CUDA toolkit
(nvcc) and a CUDA-enabled torch are present, for sm_80 and sm_90 (plus PTX for newer GPUs); on a
machine without a GPU the build skips them (a few minutes less), unless told otherwise
(the convention of detectron2's FORCE_CUDA). Environment:

    DETRKD_FORCE_CUDA=1         build the CUDA kernels even when no GPU is visible (a login node
                                that builds for GPU nodes, or CI that checks the CUDA sources)
    DETRKD_NO_CUDA=1            build the CPU kernels only
    DETRKD_CUDA_ARCH="90"       override the CUDA architectures (semicolon-separated, e.g. "80;90")
    DETRKD_PORTABLE=1           do not compile the CPU kernels for the build machine's own
                                instruction set (-march=native); use for wheels that travel
    MAX_JOBS=N                  parallel compile jobs (ninja)
    DETRKD_VERBOSE_BUILD=1      show the compilers' notes and warnings (also: setup.py --verbose)

``pip install --no-build-isolation -e .`` (pyproject.toml) installs the dependencies and runs the
same in-place build; it installs no importable package (the scripts run from this folder and
import ``common`` from it), so nothing with a generic name like ``common`` lands in
site-packages.
"""
import glob
import os
import subprocess
import sys
import tempfile
import time

from setuptools import Command, setup
from setuptools.command.build import build

# torch derives CUDA_HOME from the first nvcc on PATH; a wrapper script in /usr/local/bin would
# make that /usr/local. Prefer the standard toolkit location when nothing is set.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and \
        os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

ROOT = os.path.dirname(os.path.abspath(__file__))
# `python setup.py build_ext --inplace` builds common._C here; a pip build (bdist_wheel,
# editable_wheel) runs that same command from build_py below and packages no module.
DIRECT = "build_ext" in sys.argv[1:]


def env_flag(name):
    """An on/off environment setting: set and neither empty nor "0"."""
    return os.environ.get(name, "0") not in ("", "0")


VERBOSE = env_flag("DETRKD_VERBOSE_BUILD") or \
    any(a in ("-v", "--verbose") for a in sys.argv[1:])

# Compiler notes that come from the toolchain's own headers, not from csrc/: gcc's "the ABI for
# passing parameters with 64-byte alignment has changed" notes on every AVX-512 intrinsic under
# -march=native (-Wno-psabi), and nvcc's warnings on torch's and the CUDA toolkit's host headers.
QUIET_CXX = ["-Wno-psabi"]
QUIET_NVCC = ["-w", "-Xcompiler", "-Wno-psabi"]


def cuda_wanted():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if env_flag("DETRKD_NO_CUDA"):
        return False, "DETRKD_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (CUDA_HOME / nvcc)"
    forced = env_flag("DETRKD_FORCE_CUDA")
    if not forced and not torch.cuda.is_available():
        return False, ("no GPU visible; DETRKD_FORCE_CUDA=1 builds them anyway with the "
                       f"toolkit at {CUDA_HOME}")
    return True, f"CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}" + (
        " (DETRKD_FORCE_CUDA)" if forced else "")


def gencode_flags():
    archs = os.environ.get("DETRKD_CUDA_ARCH", "80;90").replace(",", ";").split(";")
    archs = [a.strip().replace(".", "") for a in archs if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=int)
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")  # PTX for newer GPUs
    return flags


def make_extension():
    # torch is needed to build, not to read the project's metadata
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    use_cuda, why = cuda_wanted()
    print(f"[detrkd] building common._C with{'' if use_cuda else 'out'} CUDA kernels: {why}")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-fopenmp"] + ([] if VERBOSE else QUIET_CXX)
    if not env_flag("DETRKD_PORTABLE"):
        cxx.append("-march=native")
    if not use_cuda:
        return CppExtension("common._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + gencode_flags() + \
        ([] if VERBOSE else QUIET_NVCC)
    return CUDAExtension("common._C", sources, define_macros=[("WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


class BuildInPlace(Command):
    """A pip build (``pip install -e .`` / ``pip install .``): compile common._C in place with
    ``setup.py build_ext --inplace`` (the same command the quick start runs); the wheel holds
    the metadata and the dependencies only."""
    description = "compile the extension common._C into common/"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        cmd = [sys.executable, os.path.join(ROOT, "setup.py"), "build_ext", "--inplace"]
        subprocess.run(cmd if VERBOSE else cmd[:2] + ["-q"] + cmd[2:], cwd=ROOT, check=True)


class Build(build):
    # a sub-command, so that both a wheel build and an editable install (which runs the
    # sub-commands itself) compile the extension
    sub_commands = build.sub_commands + [("build_detrkd_ext", None)]


def build_ext_class():
    """torch's BuildExtension (ninja), quiet unless verbose: it always runs ``ninja -v``, whose
    command lines and compiler output go to a temporary file that is shown only if the build
    fails."""
    from torch.utils.cpp_extension import BuildExtension

    class QuietBuildExtension(BuildExtension):
        def build_extensions(self):
            if VERBOSE:
                return super().build_extensions()
            print("[detrkd] compiling (a few minutes; more with the CUDA kernels; "
                  "DETRKD_VERBOSE_BUILD=1 shows the compiler output)", flush=True)
            start = time.time()
            with tempfile.TemporaryFile() as log:
                sys.stdout.flush()
                saved = os.dup(1)
                os.dup2(log.fileno(), 1)  # ninja's output goes to file descriptor 1
                try:
                    super().build_extensions()
                except BaseException:
                    sys.stdout.flush()
                    os.dup2(saved, 1)
                    log.seek(0)
                    sys.stdout.write(log.read().decode(errors="replace"))
                    sys.stdout.flush()
                    raise
                finally:
                    sys.stdout.flush()
                    os.dup2(saved, 1)
                    os.close(saved)
            print(f"[detrkd] built common._C in {time.time() - start:.0f} s", flush=True)

    return QuietBuildExtension.with_options(use_ninja=True)


# metadata and dependencies: pyproject.toml
setup(
    packages=[],
    py_modules=[],
    ext_modules=[make_extension()] if DIRECT else [],
    cmdclass={"build_ext": build_ext_class()} if DIRECT else
    {"build": Build, "build_detrkd_ext": BuildInPlace},
)
