"""Where the CUDA extension's sources and headers are and which GPUs it targets; shared by setup.py, the JIT
loader (rank1_kernels.cuda_jit) and the CI compile test. Imports nothing heavy: setup.py loads this file alone."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CSRC = REPO_ROOT / "csrc"
DEFAULT_ARCH_LIST = "8.0;9.0"  # A100 and H100/H200; override with TORCH_CUDA_ARCH_LIST


def cuda_sources() -> list[Path]:
    """The kernels (.cu, plain CUDA C++ with no torch headers) and the torch bindings (.cpp)."""
    return sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))


def nvidia_include_dirs() -> list[str]:
    """include/ folders of the nvidia-* wheels that a CUDA build of torch installs (cuBLAS, cuSPARSE, ... headers
    that torch's CUDA headers include), e.g. site-packages/nvidia/cu13/include."""
    found = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            found += sorted(str(include) for include in nvidia.glob("*/include") if include.is_dir())
    return list(dict.fromkeys(found))


def cuda_home() -> Path | None:
    """The CUDA toolkit: $CUDA_HOME or $CUDA_PATH, else the folder above the nvcc on PATH if it holds the headers,
    else /usr/local/cuda. (torch guesses the folder above nvcc's, which is wrong for /usr/local/bin/nvcc.)"""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate)
    return None


def late_include_flags() -> list[str]:
    """Host-compiler flags that search the nvidia-* include folders after the CUDA toolkit's own: those folders
    also carry a cuda_runtime_api.h that must not shadow the toolkit's (it lacks crt/host_defines.h)."""
    return [f"-idirafter{path}" for path in nvidia_include_dirs()]


def arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def gencode_flags(archs: str | None = None) -> list[str]:
    """nvcc -gencode flags for an arch list such as "8.0;9.0" or "8.0 9.0+PTX"."""
    flags = []
    for arch in (archs or arch_list()).replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        number = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def parallel_jobs(memory_per_job_gib: float = 4.0) -> int:
    """Parallel compile jobs: one per core, but no more than memory allows (nvcc on torch headers is hungry)."""
    cores = os.cpu_count() or 1
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 1
    return max(1, min(cores, int(memory_gib // memory_per_job_gib)))
