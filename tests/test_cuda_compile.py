"""CI has nvcc 13 but no GPU: compile every CUDA source, so a syntax or template error fails CI.

The kernels (.cu) include no torch headers and compile with nvcc alone for sm_80 and sm_90; the bindings (.cpp)
are checked by the host compiler against torch's headers and the nvidia-* wheels' include folders (cuBLAS and
friends, which torch's CUDA headers include)."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from rank1_kernels.cuda_backend import SCHEMAS
from rank1_kernels.cuda_build import CSRC, cuda_home, cuda_sources, gencode_flags, late_include_flags

NVCC = shutil.which("nvcc")
CU_FILES = [path for path in cuda_sources() if path.suffix == ".cu"]
CPP_FILES = [path for path in cuda_sources() if path.suffix == ".cpp"]


def test_there_are_sources_to_compile():
    assert [p.name for p in CU_FILES] == ["ago_kernels.cu", "pool_linear_kernels.cu"]
    assert [p.name for p in CPP_FILES] == ["bindings.cpp"]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cuda_kernels_compile_for_sm80_and_sm90(source, tmp_path):
    command = [NVCC, "-std=c++17", "-O3", "-c", str(source), "-o", str(tmp_path / "out.o"), f"-I{CSRC}"]
    command += gencode_flags("8.0;9.0")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
    assert (tmp_path / "out.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed on this machine")
@pytest.mark.skipif(cuda_home() is None, reason="no CUDA toolkit headers (cuda_runtime.h) on this machine")
@pytest.mark.parametrize("source", CPP_FILES, ids=lambda p: p.name)
def test_bindings_compile_against_torch_headers(source):
    torch_root = Path(torch.__file__).parent / "include"
    includes = [torch_root, torch_root / "torch" / "csrc" / "api" / "include", sysconfig.get_paths()["include"],
                cuda_home() / "include", CSRC]  # fmt: skip
    # The nvidia-* folders go last, as setup.py puts them: see cuda_build.late_include_flags.
    command = ["g++", "-std=c++20", "-fsyntax-only", str(source)] + [f"-I{path}" for path in includes]
    command += late_include_flags()
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"g++ failed on {source.name}:\n{result.stderr[-4000:]}"


def test_python_schemas_match_the_cpp_definitions():
    """cuda_backend.SCHEMAS (used for docs and the CPU stand-in test) must say what bindings.cpp defines."""
    text = (CSRC / "bindings.cpp").read_text()
    definitions = []
    for call in re.finditer(r"m\.def\(((?:\s*\"[^\"]*\")+)\)", text):
        definitions.append("".join(re.findall(r"\"([^\"]*)\"", call.group(1))))
    assert sorted(definitions) == sorted(SCHEMAS.values())


@pytest.mark.skipif(NVCC is None or cuda_home() is None, reason="no CUDA toolkit (nvcc and headers) on this machine")
def test_setup_builds_an_extension_that_registers_the_ops(tmp_path):
    """The real build path: `RANK1_BUILD_CUDA=1 setup.py build_ext` in a copy of the sources links rank1_kernels._C,
    whose import defines the rank1::cuda_* ops with the schemas the Python side expects (and their fake kernels
    answer on meta tensors). Nothing here runs a kernel: that needs a GPU."""
    repo = Path(__file__).resolve().parents[1]
    for item in ("rank1_kernels", "csrc", "setup.py", "pyproject.toml", "README.md"):
        source = repo / item
        if source.is_dir():
            shutil.copytree(source, tmp_path / item, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(source, tmp_path / item)
    environment = {**os.environ, "RANK1_BUILD_CUDA": "1", "MAX_JOBS": "2", "TORCH_CUDA_ARCH_LIST": "9.0"}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=environment,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    check = textwrap.dedent(
        """
        import torch
        from rank1_kernels import cuda_backend
        assert cuda_backend.extension_missing_reason() is None
        for name, schema in cuda_backend.SCHEMAS.items():
            assert str(getattr(torch.ops.rank1, name).default._schema) == "rank1::" + schema, name
        meta = lambda *shape: torch.empty(*shape, device="meta")
        idx = torch.empty(2, 3, dtype=torch.int64, device="meta")
        y, u = torch.ops.rank1.cuda_pool_linear_fwd(meta(10, 8), meta(5, 8), None, meta(4, 8), meta(5, 4), idx,
                                                     meta(2, 3), 0.5, 5, None)
        assert y.shape == (10, 5) and u.shape == (10, 3) and u.dtype == torch.float32
        print("extension ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "extension ok" in result.stdout, result.stderr[-3000:]
