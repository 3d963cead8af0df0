"""The CUDA backend's kernels and bindings, run on CPU tensors through host emulation (build.py), against the
reference ops. Not collected by the main test run (its name does not start with test_): the build registers
rank1::cuda_* for CPU tensors, so tests/test_cuda_backend.py runs this file in a pytest process of its own.

What this checks that compiling cannot: the kernels' indexing, strides, reductions and rounding, the launchers'
grids and shared memory sizes, bindings.cpp's composition of the ops, and the Python autograd/fake glue, all as
written in csrc/ and rank1_kernels/cuda_backend.py. What it cannot check: timing, real warp scheduling, and
anything of the GPU's memory model beyond __syncthreads; those need a GPU (the `gpu`-marked tests)."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: _tolerance, cuda_cases

import cuda_cases
from cuda_emulation import build

import rank1_kernels
from rank1_kernels import cuda_backend


@pytest.fixture(scope="session", autouse=True)
def emulated_ops(tmp_path_factory):
    build_dir = os.environ.get("RANK1_EMULATION_BUILD_DIR")
    sanitize = os.environ.get("RANK1_EMULATION_SANITIZE") == "1"
    build.load(Path(build_dir) if build_dir else tmp_path_factory.mktemp("cuda_emulation"), sanitize=sanitize)
    cuda_backend.CudaBackend.device_type = "cpu"
    assert cuda_backend.extension_missing_reason() is None  # registers the fakes and autograd of the real glue
    torch.set_num_threads(1)  # the emulated kernels already run one host thread per CUDA thread


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", cuda_cases.SMALL_POOL_SHAPES, ids=str)
@pytest.mark.parametrize("with_lora_input", [False, True], ids=["x", "lora_input"])
def test_pool_linear_matches_the_reference(dtype, shape, with_lora_input):
    cuda_cases.check_pool_linear("cpu", dtype, shape, with_lora_input)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", cuda_cases.DEEP_POOL_SHAPES, ids=str)
def test_pool_linear_at_vit_widths(dtype, shape):
    cuda_cases.check_pool_linear("cpu", dtype, shape, with_lora_input=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [1, 2])
def test_ago_matches_the_reference(dtype, p):
    cuda_cases.check_ago("cpu", dtype, p, cuda_cases.SMALL_AGO_LAYERS)


@pytest.mark.parametrize("p", [1, 2])
def test_ago_gradient_of_the_history(p):
    cuda_cases.check_ago_prev_gradient("cpu", p)


def test_ago_table_first_made_under_inference_mode():
    cuda_cases.check_ago_table_first_made_under_inference_mode("cpu")


def test_opcheck():
    cuda_cases.check_opcheck("cpu")


def test_only_the_wanted_gradients_are_computed():
    cuda_cases.check_partial_gradients("cpu")


def test_compiled_layer():
    cuda_cases.check_compiled_layer("cpu")


def test_non_contiguous_inputs():
    """The bindings take any strides (they make contiguous copies): a transposed x and a sliced A."""
    x, weight, bias, A, B, idx, gates = cuda_cases.pool_case("cpu", 3, 4, 10, 9, 6, 2, torch.float32)
    x_t = x.t().contiguous().t()  # same values, column-major
    A_wide = torch.cat([A, torch.randn_like(A)], dim=1)[:, : A.shape[1]]
    assert not x_t.is_contiguous() and not A_wide.is_contiguous()
    got = rank1_kernels.rank1_pool_linear(x_t, weight, bias, A_wide, B, idx, gates, 0.5, 4, backend="cuda")
    want = rank1_kernels.rank1_pool_linear(x, weight, bias, A, B, idx, gates, 0.5, 4, backend="reference")
    oracle = rank1_kernels.rank1_pool_linear(
        *(t.double() for t in (x, weight, bias, A, B)), idx, gates.double(), 0.5, 4, backend="reference"
    )
    cuda_cases.assert_close_by_rule(got, want, oracle, "non-contiguous inputs")


def test_the_registered_ops_check_every_argument():
    """torch.ops.rank1.cuda_* are public: a wrong shape or dtype of any argument is an error, not a read past a
    buffer (only x's were checked before)."""
    x, weight, bias, A, B, idx, gates = cuda_cases.pool_case("cpu", 2, 3, 8, 5, 6, 2, torch.float32)
    good = dict(x=x, weight=weight, bias=bias, A=A, B=B, idx=idx, gates=gates, scaling=0.5, tokens_per_sample=3,
                lora_input=None)  # fmt: skip
    wrong = {
        "gates of another dtype": ({"gates": gates.half()}, "gates must be on x's device and of x's dtype"),
        "A narrower than x": ({"A": A[:, :4]}, r"expected weight \(d_out, d_in\), A \(r, d_in\)"),
        "gates for fewer samples": ({"gates": gates[:1]}, "gates must have idx's shape"),
        "int32 idx": ({"idx": idx.int()}, "idx must be int64"),
        "lora_input of another shape": ({"lora_input": x[:, :4]}, "lora_input must have x's shape"),
    }
    for case, (change, message) in wrong.items():
        with pytest.raises(RuntimeError, match=message):
            torch.ops.rank1.cuda_pool_linear_fwd(**{**good, **change})
        print("refused:", case)
    y, u = torch.ops.rank1.cuda_pool_linear_fwd(**good)
    backward = dict(grad_y=torch.randn_like(y), x=x, weight=weight, A=A, B=B, idx=idx, gates=gates, u=u, scaling=0.5,
                    tokens_per_sample=3, lora_input=None, need_x=True, need_lora_input=False, need_A=True, need_B=True,
                    need_gates=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="u must be the forward's float32"):
        torch.ops.rank1.cuda_pool_linear_bwd(**{**backward, "u": u[:, :1]})
    with pytest.raises(RuntimeError, match="grad_y must be"):
        torch.ops.rank1.cuda_pool_linear_bwd(**{**backward, "grad_y": y[:, :2]})
    with pytest.raises(RuntimeError, match="need_lora_input without a lora_input"):
        torch.ops.rank1.cuda_pool_linear_bwd(**{**backward, "need_lora_input": True})
    curs, prevs = [torch.randn(4, 3)], [torch.randn(4, 2)]
    masks, prev_masks = [torch.ones(3, dtype=torch.bool)], [torch.ones(2, dtype=torch.bool)]
    losses, gram = torch.ops.rank1.cuda_ago_fwd(curs, prevs, masks, prev_masks, 1)
    with pytest.raises(RuntimeError, match="grad must hold one value per layer"):
        torch.ops.rank1.cuda_ago_bwd(torch.ones(2), gram, curs, prevs, masks, prev_masks, 1, False)
    with pytest.raises(RuntimeError, match="p must be 1 or 2"):
        torch.ops.rank1.cuda_ago_bwd(torch.ones(1), gram, curs, prevs, masks, prev_masks, 3, False)
    with pytest.raises(RuntimeError, match="every B must be Float"):
        torch.ops.rank1.cuda_ago_fwd(curs, [prevs[0].half()], masks, prev_masks, 1)
    # The device checks need a second device (on one, a "meta" mask dispatches to the fake): unchecked here.


def test_results_are_bitwise_deterministic():
    """Fixed reduction orders and no atomics: two runs give the same bits, forward and backward."""
    x, weight, bias, A, B, idx, gates = cuda_cases.pool_case("cpu", 3, 5, 17, 21, 7, 3, torch.bfloat16)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, gates)]
        y = rank1_kernels.rank1_pool_linear(
            leaves[0], weight, bias, *leaves[1:3], idx, leaves[3], 0.5, 5, backend="cuda"
        )
        return [y, *torch.autograd.grad(y.square().sum(), leaves)]

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_a_launch_beyond_cuda_limits_raises():
    """The expand kernel's grid has one y-block per 256 output columns; CUDA allows 65535, so d_out beyond
    65535 * 256 cannot launch. The launcher must say so (cudaGetLastError), not return unwritten memory."""
    d_out = 65535 * 256 + 1
    x = torch.randn(1, 1)
    weight, B = torch.randn(d_out, 1), torch.randn(d_out, 1)
    A, idx, gates = torch.randn(1, 1), torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1)
    with pytest.raises(RuntimeError, match="launch of expand_add_kernel failed"):
        torch.ops.rank1.cuda_pool_linear_fwd(x, weight, None, A, B, idx, gates, 1.0, 1, None)


def test_emulated_16_bit_conversions_match_torch():
    """Every fp16 and bf16 bit pattern widens as torch widens it; floats round to fp16/bf16 as torch rounds them
    (round to nearest even), including ties, subnormals, overflow to infinity, infinities and NaN."""
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for narrow, to_float in ((torch.float16, "half_bits_to_float"), (torch.bfloat16, "bfloat16_bits_to_float")):
        want = patterns.view(narrow).float()
        got = getattr(torch.ops.rank1_emu, to_float)(patterns)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~want.isnan()], want[~want.isnan()]), narrow

    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    # Exact ties and near-ties of both formats, around the subnormal and overflow boundaries too.
    grid = torch.cat(
        [
            torch.arange(0, 1 << 14),
            torch.arange(0x33000000, 0x33000000 + (1 << 14)),
            torch.arange(0x38800000 - (1 << 13), 0x38800000 + (1 << 13)),
            torch.arange(0x477FE000, 0x47800000 + 16),
            torch.arange(0x3F800000, 0x3F800000 + (1 << 17)),
        ]
    )
    bits = torch.cat([random_bits, grid.to(torch.int32), -grid.to(torch.int32)])
    values = bits.view(torch.float32)
    values = torch.cat(
        [
            values,
            torch.tensor(
                [
                    0.0,
                    -0.0,
                    float("inf"),
                    -float("inf"),
                    float("nan"),
                    65504.0,
                    65519.99,
                    65520.0,
                    3.3895314e38,
                    3.4028235e38,
                ]
            ),
        ]
    )
    for narrow, to_bits in ((torch.float16, "float_to_half_bits"), (torch.bfloat16, "float_to_bfloat16_bits")):
        want = values.to(narrow)
        got = getattr(torch.ops.rank1_emu, to_bits)(values).view(narrow)
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        assert same.all(), f"{narrow}: {int((~same).sum())} values round differently, e.g. {values[~same][:4].tolist()}"


def test_the_ops_check_the_row_layout():
    """Called directly (not through rank1_pool_linear's validation), the op refuses rows that are not
    n_samples * tokens_per_sample instead of reading past the inputs."""
    x, weight, bias, A, B, idx, gates = cuda_cases.pool_case("cpu", 3, 4, 10, 9, 6, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"x must have idx.size\(0\) \* tokens_per_sample rows \(3 \* 5\), got 12"):
        torch.ops.rank1.cuda_pool_linear_fwd(x, weight, bias, A, B, idx, gates, 0.5, 5, None)
    with pytest.raises(RuntimeError, match="tokens_per_sample rows"):
        torch.ops.rank1.cuda_pool_linear_fwd(x, weight, bias, A, B, idx, gates, 0.5, 0, None)


def _continual_run(backend, dtype):
    """Two tasks of the paper's protocol on a small injected model (PoolLifecycle: fresh pools, SGD steps, AGO
    against the first task's merged experts in the second, merges at each task's end); returns the final state and
    the outputs on a fixed input. The same seeds for every backend and dtype, so the runs differ only in arithmetic."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("fc1", torch.nn.Linear(16, 24))
    model.add_module("act", torch.nn.GELU())
    model.add_module("fc2", torch.nn.Linear(24, 10))
    rank1_kernels.inject(model, target=["fc1", "fc2"], r=6, k=3, backend=backend, gate="softmax")
    model = model.to(dtype)
    rank1_kernels.mark_only_pool_trainable(model)
    lifecycle = rank1_kernels.PoolLifecycle(model, top_m=2, ago_weight=1.0, backend=backend)
    data = torch.Generator().manual_seed(1)
    for task in range(2):
        lifecycle.begin_task(task)
        # The fresh pool drawn again from an fp32 generator, so that every dtype starts each task from the same
        # values. B random rather than zero: after a few steps from zero the AGO term (products of B columns)
        # would stay below rounding.
        init = torch.Generator().manual_seed(10 + task)
        with torch.no_grad():
            for _, layer in rank1_kernels.pool_layers(model):
                for name, parameter in layer.named_parameters():
                    if name not in ("weight", "bias"):  # the frozen base
                        parameter.copy_(0.3 * torch.randn(parameter.shape, generator=init))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            x = torch.randn(4, 5, 16, generator=data).to(dtype)
            target = torch.randn(4, 5, 10, generator=data).to(dtype)
            loss = (model(x) - target).square().mean() + lifecycle.loss_extra()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        lifecycle.end_task()
    probe = torch.randn(3, 5, 16, generator=data).to(dtype)
    with torch.no_grad():
        return model(probe), {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_continual_learning_with_the_cuda_backend_follows_the_reference():
    """End to end through inject, routing, the fused ops' gradients, the AGO penalty and the merges: the emulated
    CUDA backend ends where the reference backend ends, by the tolerance rule against an fp64 run."""
    # Top-k routing is discontinuous: the fp64 run could in principle choose other experts after some steps. With
    # these seeds it does not (the merged experts agree to rounding); a change that breaks this shows as a large
    # error in merged_A / merged_B, not as a small one.
    got_out, got_state = _continual_run("cuda", torch.float32)
    same_out, same_state = _continual_run("reference", torch.float32)
    oracle_out, oracle_state = _continual_run("reference", torch.float64)
    assert torch.equal(got_state["fc1.merge_sizes"], oracle_state["fc1.merge_sizes"])
    for name, oracle in oracle_state.items():
        if name.split(".")[1] in ("lora_A", "lora_B", "router", "activation_counts"):
            continue  # the fresh pool end_task() drew for a next task (and the probe's routing through it)
        if oracle.is_floating_point():  # base weights with the merges, merged experts: the same experts merged
            cuda_cases.assert_close_by_rule(got_state[name], same_state[name], oracle, f"state {name}")
        else:
            assert torch.equal(got_state[name], oracle), name
    cuda_cases.assert_close_by_rule(got_out, same_out, oracle_out, "outputs after two tasks")
