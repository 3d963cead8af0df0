"""The "cuda" backend: refusals, the build decision, the kernels run on CPU through host emulation (every machine
with g++), and the same checks on a GPU (marked `gpu`, skipped without CUDA). tests/cuda_cases.py holds the checks
both runs share."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cuda_cases
import pytest
import torch

import rank1_kernels
from rank1_kernels import cuda_backend
from rank1_kernels.cuda_build import gencode_flags, parallel_jobs

REPO = Path(__file__).resolve().parents[1]


def _load_setup():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rank1_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only under __main__
    return module


def test_forced_on_cpu_tensors_says_why_and_what_to_do():
    layer = rank1_kernels.FusedRank1PoolLinear(8, 6, r=4, k=2, backend="cuda")
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run pool_linear here: the CUDA kernels run on CUDA"):
        layer(torch.randn(2, 3, 8))


def test_missing_extension_names_the_build_command():
    if not torch.cuda.is_available() and hasattr(torch.ops.rank1, "cuda_pool_linear_fwd"):
        pytest.skip("the rank1::cuda_* ops are loaded in this process")
    reason = cuda_backend.extension_missing_reason()
    if reason is not None:
        assert cuda_backend.BUILD_COMMAND in reason and "rank1_kernels._C" in reason


def test_auto_never_picks_cuda_for_cpu_tensors():
    layer = rank1_kernels.FusedRank1PoolLinear(8, 6, r=4, k=2)
    idx, gates = torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2)
    inputs = [torch.randn(4, 8), layer.weight, layer.bias, layer.lora_A, layer.lora_B, idx, gates]
    backend = rank1_kernels.resolve_backend("auto", "pool_linear", inputs)
    assert backend.name == "reference"


def test_build_decision():
    setup = _load_setup()
    assert setup.extension_decision({}, torch_importable=True)[0] is False
    assert setup.extension_decision({"RANK1_BUILD_CUDA": "1"}, torch_importable=True) == (True, "RANK1_BUILD_CUDA=1")
    assert (
        setup.extension_decision({"RANK1_BUILD_CUDA": "1", "RANK1_SKIP_CUDA": "1"}, torch_importable=True)[0] is False
    )
    with pytest.raises(RuntimeError, match="--no-build-isolation"):
        setup.extension_decision({"RANK1_BUILD_CUDA": "1"}, torch_importable=False)


def test_arch_flags_and_jobs(monkeypatch):
    assert gencode_flags("8.0;9.0") == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    assert gencode_flags("9.0+PTX") == [
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert gencode_flags() == ["-gencode=arch=compute_86,code=sm_86"]
    assert 1 <= parallel_jobs() <= (__import__("os").cpu_count() or 1)


# ---- on CPU: the kernels themselves, run as host threads --------------------------------------------------------

EMULATION_CHECKS = REPO / "tests" / "cuda_emulation" / "kernel_checks.py"


def _run_emulated_checks(tmp_path, extra_env):
    """tests/cuda_emulation/kernel_checks.py in a pytest process of its own (the emulated build registers the
    rank1::cuda_* ops for CPU tensors, which must not leak into this process)."""
    environment = {**os.environ, "RANK1_EMULATION_BUILD_DIR": str(tmp_path / "build"), **extra_env}
    command = [sys.executable, "-m", "pytest", str(EMULATION_CHECKS), "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=1500)
    reports = "".join(path.read_text()[:6000] for path in tmp_path.glob("sanitizer.*"))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:] + reports
    assert " passed" in result.stdout and "failed" not in result.stdout and "skipped" not in result.stdout, (
        result.stdout
    )
    print(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed on this machine")
def test_kernels_under_host_emulation(tmp_path):
    """csrc/ compiled as C++ with each CUDA thread a host thread (tests/cuda_emulation/): the real kernels, launchers,
    bindings and Python glue against the reference ops, in every dtype, with opcheck and torch.compile."""
    _run_emulated_checks(tmp_path, {})


def _libasan():
    if shutil.which("gcc") is None:
        return None
    paths = [subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
             for name in ("libasan.so", "libstdc++.so")]  # fmt: skip
    return paths if all(Path(path).is_absolute() and Path(path).exists() for path in paths) else None


@pytest.mark.skipif(_libasan() is None, reason="gcc's AddressSanitizer runtime (libasan) is not installed")
def test_kernels_under_host_emulation_with_sanitizers(tmp_path):
    """The same checks with the build instrumented by AddressSanitizer and UndefinedBehaviorSanitizer: an
    out-of-bounds read or write of any kernel (on the tensors' heap buffers), a misaligned access or an overflow
    aborts the run with the .cu line. libasan must be preloaded into Python; libstdc++ with it, or ASan cannot
    intercept C++ exceptions."""
    environment = {
        "RANK1_EMULATION_SANITIZE": "1",
        "LD_PRELOAD": " ".join(_libasan()),
        "ASAN_OPTIONS": f"detect_leaks=0:log_path={tmp_path / 'sanitizer'}",
        "UBSAN_OPTIONS": f"print_stacktrace=1:log_path={tmp_path / 'sanitizer'}",
    }
    _run_emulated_checks(tmp_path, environment)


# ---- on a GPU: the kernels against the reference -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_ops():
    if cuda_backend.extension_missing_reason() is not None:
        from rank1_kernels import cuda_jit

        cuda_jit.load()
    return cuda_backend


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", cuda_cases.SMALL_POOL_SHAPES + cuda_cases.VIT_POOL_SHAPES, ids=str)
@pytest.mark.parametrize("with_lora_input", [False, True], ids=["x", "lora_input"])
def test_pool_linear_matches_the_reference(cuda_ops, dtype, shape, with_lora_input):
    cuda_cases.check_pool_linear("cuda", dtype, shape, with_lora_input)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [1, 2])
def test_ago_matches_the_reference(cuda_ops, dtype, p):
    cuda_cases.check_ago("cuda", dtype, p, cuda_cases.VIT_AGO_LAYERS)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [1, 2])
def test_ago_gradient_of_the_history_on_gpu(cuda_ops, p):
    cuda_cases.check_ago_prev_gradient("cuda", p)


@pytest.mark.gpu
def test_ago_table_first_made_under_inference_mode_on_gpu(cuda_ops):
    cuda_cases.check_ago_table_first_made_under_inference_mode("cuda")


@pytest.mark.gpu
def test_opcheck_on_gpu(cuda_ops):
    cuda_cases.check_opcheck("cuda")


@pytest.mark.gpu
def test_only_the_wanted_gradients_are_computed_on_gpu(cuda_ops):
    cuda_cases.check_partial_gradients("cuda")


@pytest.mark.gpu
def test_ago_captures_in_a_cuda_graph_after_a_warm_up_step(cuda_ops):
    """The grouped AGO op keeps its per-layer tables (offsets and sizes, by the layers' shapes) on the device: after
    one warm-up step, forward and backward capture in a CUDA graph, with the masks made afresh every step as
    ago_penalty makes them, and replaying the graph gives the eager result."""
    g = torch.Generator(device="cuda").manual_seed(3)
    curs = [torch.randn(d, r, device="cuda", generator=g).requires_grad_() for d, r, _ in cuda_cases.VIT_AGO_LAYERS]
    prevs = [torch.randn(d, m, device="cuda", generator=g) for d, _, m in cuda_cases.VIT_AGO_LAYERS]
    usage = [torch.rand(r, device="cuda", generator=g) for _, r, _ in cuda_cases.VIT_AGO_LAYERS]

    def step():
        masks = [counts > 0.5 for counts in usage]  # new tensors each call
        prev_masks = [torch.ones(prev.shape[1], dtype=torch.bool, device="cuda") for prev in prevs]
        losses = rank1_kernels.ago_loss_grouped(curs, prevs, masks, prev_masks, 1, backend="cuda")
        return [losses, *torch.autograd.grad(losses.sum(), curs)]

    expected = step()  # warm-up: the tables reach the device here
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)


# Last in the file: its first Inductor compile takes the longest of these tests, so a session's time limit that
# cuts the run short loses only it.
@pytest.mark.gpu
def test_compiled_layer_on_gpu(cuda_ops):
    cuda_cases.check_compiled_layer("cuda")
