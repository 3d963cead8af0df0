"""Build hooks beyond pyproject.toml: the optional CUDA extension rank1_kernels._C (csrc/).

A plain `pip install -e .` never builds it (pip builds in an isolated environment without torch, and the package
works without the extension: reference and Triton backends). To build it, on a machine with nvcc and a CUDA build
of torch:

    RANK1_BUILD_CUDA=1 pip install -e . --no-build-isolation

TORCH_CUDA_ARCH_LIST picks the GPUs (default "8.0;9.0": A100, H100/H200); MAX_JOBS the parallel compiles (default:
by cores and memory). RANK1_SKIP_CUDA=1 skips the extension even when RANK1_BUILD_CUDA is set.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup


def _load_cuda_build():
    path = Path(__file__).parent / "rank1_kernels" / "cuda_build.py"
    spec = importlib.util.spec_from_file_location("rank1_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_decision(environ=os.environ, torch_importable=None):
    """(build?, why): the CUDA extension is built only when asked for and possible."""
    if environ.get("RANK1_SKIP_CUDA") == "1":
        return False, "RANK1_SKIP_CUDA=1"
    if environ.get("RANK1_BUILD_CUDA") != "1":
        return False, "not requested (set RANK1_BUILD_CUDA=1 and use --no-build-isolation to build it)"
    if torch_importable is None:
        torch_importable = importlib.util.find_spec("torch") is not None
    if not torch_importable:
        raise RuntimeError(
            "RANK1_BUILD_CUDA=1 but torch is not importable in the build environment; "
            "install torch first and run pip with --no-build-isolation"
        )
    return True, "RANK1_BUILD_CUDA=1"


def _cuda_extension_kwargs():
    build, why = extension_decision()
    if not build:
        print(f"rank1-kernels: CUDA extension not built ({why}); the reference and Triton backends are available")
        return {}
    cuda_build = _load_cuda_build()
    toolkit = cuda_build.cuda_home()
    if toolkit is not None:
        os.environ.setdefault("CUDA_HOME", str(toolkit))  # read when torch.utils.cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_build.arch_list())
    os.environ.setdefault("MAX_JOBS", str(cuda_build.parallel_jobs()))
    extension = CUDAExtension(
        name="rank1_kernels._C",
        sources=[str(path.relative_to(Path(__file__).parent)) for path in cuda_build.cuda_sources()],
        include_dirs=[str(cuda_build.CSRC)],
        extra_compile_args={"cxx": ["-O3", *cuda_build.late_include_flags()], "nvcc": ["-O3"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


if __name__ == "__main__":
    setup(**_cuda_extension_kwargs())
