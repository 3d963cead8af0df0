"""Development path: JIT-compile the CUDA extension with torch.utils.cpp_extension.load and register its ops.

    import rank1_kernels.cuda_jit as cuda_jit
    cuda_jit.load()          # compiles csrc/ once (cached under torch's extension dir), then backend="cuda" works
"""

from __future__ import annotations

from .cuda_build import CSRC, arch_list, cuda_home, cuda_sources, late_include_flags


def load(verbose: bool = False) -> None:
    import os

    toolkit = cuda_home()
    if toolkit is not None:
        os.environ.setdefault("CUDA_HOME", str(toolkit))  # read when torch.utils.cpp_extension is imported
    from torch.utils.cpp_extension import load as load_extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arch_list())
    load_extension(
        name="rank1_kernels_cuda_jit",
        sources=[str(path) for path in cuda_sources()],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3", *late_include_flags()],
        extra_cuda_cflags=["-O3"],
        is_python_module=False,
        verbose=verbose,
    )
    from .cuda_backend import register_python_parts

    register_python_parts()
