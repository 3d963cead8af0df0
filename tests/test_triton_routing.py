"""The Triton routing kernel (scores, top k, gates and activation counts in one launch) against `route_reference`.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1). The exact checks
use small-integer inputs: every score is then the same number whatever the order of the sums, so the chosen experts
must equal the reference's exactly, ties (which small integers make plentiful) included."""

import copy
import itertools

import pytest
import torch

pytest.importorskip("triton")

from _tolerance import assert_close_by_rule

from rank1_kernels import FusedRank1PoolLinear, resolve_backend, route
from rank1_kernels.routing import route_reference
from rank1_kernels.triton_routing import MAX_EXPERTS, triton_route


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _integer_inputs(n_samples, d_in, n_experts, dtype, device, with_bias=True, seed=0, strided=False):
    """Routing tokens, router weight and bias with small-integer values (exact scores in every dtype's rounding).
    strided: tokens as every other token of a longer sequence, the router weight a transposed copy (both
    non-contiguous, as a layer's routing tokens are)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(-3, 4, (n_samples, 2 if strided else 1, d_in), generator=g).select(1, 0)
    weight = torch.randint(-2, 3, (n_experts, d_in), generator=g)
    if strided:
        weight = weight.t().contiguous().t()
    bias = torch.randint(-2, 3, (n_experts,), generator=g) if with_bias else None
    return [t.to(device, dtype) if t is not None else None for t in (tokens, weight, bias)]


# (n_samples, d_in, r, k): one sample, one expert, k = r, odd and prime sizes, more samples than a block (16),
# an r over 64 (eight warps on a GPU) and inputs deeper than one 64-wide tile.
SHAPES = [(1, 5, 3, 1), (3, 7, 12, 4), (20, 33, 17, 17), (37, 16, 64, 8), (5, 9, 1, 1), (4, 131, 70, 3)]


@pytest.mark.parametrize("mode", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_chooses_and_counts_exactly_as_the_reference(shape, dtype, mode):
    n_samples, d_in, n_experts, k = shape
    for with_bias, strided in itertools.product((True, False), (False, True)):
        tokens, weight, bias = _integer_inputs(n_samples, d_in, n_experts, dtype, _device(), with_bias, strided=strided)
        counts = torch.randint(0, 5, (n_experts,), device=_device())
        expected_counts = counts.clone()
        expected, _ = route_reference(tokens, weight, bias, k, mode, expected_counts)
        idx, gates = triton_route(tokens, weight, bias, k, mode, counts)
        what = f"bias={with_bias}, strided={strided}"
        assert torch.equal(idx, expected), f"{what}: chose {idx.tolist()}, expected {expected.tolist()}"
        assert gates is None, f"{what}: gate 'none' has no gates to write"
        assert torch.equal(counts, expected_counts), f"{what}: counts {counts.tolist()}, expected {expected_counts}"
        assert torch.equal(triton_route(tokens, weight, bias, k, mode, None)[0], expected), f"{what}: without counts"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_picks_the_best_scores_on_random_inputs(dtype):
    """Real-valued inputs: the sums' order may round a near tie either way, so this checks what must hold whatever
    the order: every chosen expert's exact (fp64) score is at least every unchosen one's, up to the rounding of the
    scores in `dtype`."""
    g = torch.Generator().manual_seed(3)
    shapes = ((40, 96), (48, 96), (48,))
    tokens, weight, bias = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes)
    idx = triton_route(*(t.to(_device(), dtype) for t in (tokens, weight, bias)), 6, "sample", None)[0].cpu()
    low, high = (t.to(dtype).double() for t in (tokens, weight)), bias.to(dtype).double()
    exact = torch.nn.functional.linear(*low, high)
    slack = 2 * torch.finfo(dtype).eps * exact.abs().amax(dim=1, keepdim=True)
    chosen = torch.zeros_like(exact, dtype=torch.bool).scatter_(1, idx, True)
    assert (chosen.sum(1) == 6).all(), f"repeated experts: {idx.tolist()}"
    worst_chosen = exact.masked_fill(~chosen, float("inf")).amin(1, keepdim=True)
    best_unchosen = exact.masked_fill(chosen, float("-inf")).amax(1, keepdim=True)
    assert (worst_chosen >= best_unchosen - slack).all()


def test_bf16_scores_round_to_nearest_even_as_the_reference():
    """The kernel rounds its fp32 scores through the input dtype, as the reference's bf16 F.linear does: 1 + 3 * 2^-9
    rounds up to 1 + 2^-7 and beats 1.0 (truncated, it would tie with it and expert 0 would win the tie)."""
    tokens = torch.ones(1, 2, dtype=torch.bfloat16, device=_device())
    weight = torch.tensor([[1.0, 0.0], [1.0, 3 * 2.0**-9]], dtype=torch.bfloat16, device=_device())
    assert route_reference(tokens, weight, None, 1, "sample", None, True, "none")[0].tolist() == [[1]]
    assert triton_route(tokens, weight, None, 1, "sample", None, "none")[0].tolist() == [[1]]


@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_strided_router_bias_and_counts(mode):
    """A router bias and activation counts that are every other element of a wider buffer (the kernel reads the
    bias and adds to the counts at unit stride; the views must still be read and written where they are)."""
    tokens, weight, bias = _integer_inputs(9, 11, 10, torch.float32, _device(), seed=4)
    wide_bias = torch.zeros(2 * 10, device=_device())
    wide_bias[1::2] = bias * 5  # large enough to decide most choices: a bias read at the wrong place shows
    wide_counts = torch.zeros(2 * 10, dtype=torch.int64, device=_device())
    expected_counts = torch.zeros(10, dtype=torch.int64, device=_device())
    expected, _ = route_reference(tokens, weight, wide_bias[1::2], 3, mode, expected_counts)
    idx, _ = triton_route(tokens, weight, wide_bias[1::2], 3, mode, wide_counts[1::2])
    assert torch.equal(idx, expected)
    assert torch.equal(wide_counts[1::2], expected_counts) and not wide_counts[0::2].any()


def test_non_finite_scores_still_give_distinct_experts_in_range():
    """With the device-sync checks off (a GPU's default) nothing stops a NaN routing token: the kernel must still
    write k distinct experts in [0, r) per sample (the fused linear reads A and B at them)."""
    tokens = torch.randn(4, 8, device=_device())
    tokens[1] = float("nan")
    tokens[2, 0] = float("inf")
    weight = torch.randn(10, 8, device=_device())
    for mode in ("sample", "batch"):
        idx, _ = triton_route(tokens, weight, None, 5, mode, None)
        assert idx.min() >= 0 and idx.max() < 10, idx
        assert all(len(set(row)) == 5 for row in idx.tolist()), idx


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the checks are off by default")
def test_route_on_cpu_checks_for_non_finite_scores_first():
    tokens = torch.randn(3, 8)
    tokens[2, 4] = float("nan")
    weight = torch.randn(6, 8)
    with pytest.raises(ValueError, match="NaN or Inf .* sample 2"):
        route(tokens, weight, None, 2, backend="triton")


def test_who_routes():
    """gate="none" routes with the backend's kernel where it has one; a backend without one (CUDA C++), or one that
    refuses the inputs (more experts than the kernel holds), leaves it to the reference instead of failing."""
    tokens, weight, bias = _integer_inputs(2, 8, 6, torch.float32, _device())
    assert resolve_backend("triton", "route", [tokens, weight, bias]).name == "triton"
    assert resolve_backend("cuda", "route", [tokens, weight, bias]).name == "reference"
    big = torch.zeros(MAX_EXPERTS + 1, 8, device=_device())
    assert resolve_backend("triton", "route", [tokens, big]).name == "reference"
    if _device().type == "cuda":
        assert resolve_backend("auto", "route", [tokens, weight, bias]).name == "triton"
    idx, gates = route(tokens, weight, bias, 3, backend="cuda")
    assert torch.equal(idx, route_reference(tokens, weight, bias, 3)[0]) and torch.equal(gates, torch.ones_like(gates))


def test_counts_must_fit_the_pool():
    tokens, weight, bias = _integer_inputs(2, 8, 6, torch.float32, _device())
    for counts in (torch.zeros(5, dtype=torch.int64), torch.zeros(6, dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"counts must be int64 of shape \(r=6,\)"):
            route(tokens, weight, bias, 3, counts=counts.to(_device()), backend="triton")


def _gate_case(n_samples, d_in, n_experts, dtype, seed, strided=False):
    """Small-integer inputs (the same choice whatever the summation order) needing grad, and their fp64 copies."""
    inputs = _integer_inputs(n_samples, d_in, n_experts, dtype, _device(), seed=seed, strided=strided)
    low = [t.detach().clone().requires_grad_() for t in inputs]
    oracle = [t.detach().double().requires_grad_() for t in inputs]
    return low, oracle


def _check_learned_gates(n_samples, d_in, n_experts, k, dtype, gate, mode, strided=False):
    """The kernel's gates (softmax over the chosen scores, or their sigmoid) and the router's gradient through them
    (tokens, weight, bias) against the reference in the same dtype and an fp64 oracle, by the tolerance rule."""
    (tokens, weight, bias), oracle_inputs = _gate_case(n_samples, d_in, n_experts, dtype, seed=k, strided=strided)
    reference_inputs = [t.detach().clone().requires_grad_() for t in (tokens, weight, bias)]
    idx, gates = triton_route(tokens, weight, bias, k, mode, None, gate)
    reference_idx, reference_gates = route_reference(*reference_inputs, k, mode, gate=gate)
    oracle_idx, oracle_gates = route_reference(*oracle_inputs, k, mode, gate=gate)
    assert torch.equal(idx, reference_idx) and torch.equal(idx, oracle_idx)
    assert gates.dtype == dtype
    assert_close_by_rule(gates, reference_gates, oracle_gates, f"{gate} gates")
    weights = torch.randn(n_samples, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name, ours, theirs, exact in zip(
        ("tokens", "router weight", "router bias"),
        torch.autograd.grad((gates * weights.to(gates)).sum(), (tokens, weight, bias)),
        torch.autograd.grad((reference_gates * weights.to(reference_gates)).sum(), reference_inputs),
        torch.autograd.grad((oracle_gates * weights.to(oracle_gates)).sum(), oracle_inputs),
    ):
        assert ours.dtype == dtype, name
        assert_close_by_rule(ours, theirs, exact, f"d {name} through {gate} gates")


@pytest.mark.parametrize("mode", ["sample", "batch"])
@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 12, 4), (20, 33, 17, 17), (5, 9, 1, 1), (4, 70, 40, 3)], ids=str)
def test_learned_gates_and_their_router_gradient(shape, dtype, gate, mode):
    """Odd and prime sizes, more samples than a block (16), inputs wider than one column block, k = r."""
    _check_learned_gates(*shape, dtype, gate, mode, strided=shape[0] == 4)


def test_router_gradient_gives_only_the_gradients_asked_for():
    """Each of d_tokens, d_W and d_bias alone (the others not requiring grad), against the reference."""
    inputs, _ = _gate_case(6, 21, 10, torch.float32, seed=2)
    for wanted in range(3):
        ours = [t.detach().clone().requires_grad_(i == wanted) for i, t in enumerate(inputs)]
        theirs = [t.detach().clone().requires_grad_(i == wanted) for i, t in enumerate(inputs)]
        _, gates = triton_route(*ours, 3, "sample", None, "sigmoid")
        _, reference_gates = route_reference(*theirs, 3, "sample", gate="sigmoid")
        (grad,) = torch.autograd.grad(gates.square().sum(), ours[wanted])
        (reference_grad,) = torch.autograd.grad(reference_gates.square().sum(), theirs[wanted])
        torch.testing.assert_close(grad, reference_grad)


def test_learned_gates_without_grad_carry_no_graph():
    (tokens, weight, bias), _ = _gate_case(4, 8, 6, torch.float32, seed=0)
    with torch.no_grad():
        _, gates = triton_route(tokens, weight, bias, 3, "sample", None, "softmax")
    assert gates.grad_fn is None and not gates.requires_grad
    _, gates = triton_route(tokens.detach(), weight.detach(), bias.detach(), 3, "sample", None, "sigmoid")
    assert gates.grad_fn is None


def test_opcheck():
    tokens, weight, bias = _integer_inputs(5, 7, 9, torch.float32, _device())
    for batch in (False, True):
        counts = torch.zeros(9, dtype=torch.int64, device=_device())
        for gate in ("none", "softmax", "sigmoid"):
            args = (tokens, weight, bias, 3, batch, gate, counts)
            torch.library.opcheck(torch.ops.rank1.triton_route.default, args)
        torch.library.opcheck(torch.ops.rank1.triton_route.default, (tokens, weight, None, 3, batch, "none", None))
    idx, _, gates32 = torch.ops.rank1.triton_route(tokens, weight, bias, 3, False, "softmax", None)
    grad_gates = torch.randn(5, 3, device=_device())
    for gate, needs in itertools.product(("softmax", "sigmoid"), ((True, True, True), (False, True, False))):
        args = (grad_gates, gates32, idx, tokens, weight, gate, *needs)
        torch.library.opcheck(torch.ops.rank1.triton_route_grad.default, args)


def _gate_none_layers(routing, device):
    torch.manual_seed(5)
    layer = FusedRank1PoolLinear(12, 7, r=9, k=3, routing=routing, backend="triton", device=device)
    with torch.no_grad():
        layer.lora_B.normal_()
    reference = copy.deepcopy(layer)
    reference.backend = "reference"
    return layer, reference


@pytest.mark.parametrize("routing", ["sample", "batch"])
def test_layer_counts_as_the_reference_layer_and_only_in_training(routing):
    layer, reference = _gate_none_layers(routing, _device())
    x = torch.randint(-2, 3, (4, 6, 12), device=_device()).float()  # integer scores: the same choices
    for module in (layer, reference):
        module.train()(x)
        module(x)
        module.eval()(x)
    assert torch.equal(layer.activation_counts, reference.activation_counts)
    assert int(layer.activation_counts.sum()) == 2 * 4 * 3
    torch.testing.assert_close(layer(x), reference(x))


def _compiled_counts_match_eager(device):
    """torch.compile(fullgraph=True) traces the routing op, whose in-place count update must survive
    functionalization."""
    for routing in ("sample", "batch"):
        layer, reference = _gate_none_layers(routing, device)
        compiled = torch.compile(layer.train(), fullgraph=True)
        x = torch.randint(-2, 3, (3, 5, 12), device=device).float()
        for _ in range(2):
            torch.testing.assert_close(compiled(x), reference.train()(x))
        assert torch.equal(layer.activation_counts, reference.activation_counts), routing
        assert int(layer.activation_counts.sum()) == 2 * 3 * 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU variant below runs instead")
def test_torch_compile_fullgraph_counts_on_cpu_interpreter():
    _compiled_counts_match_eager(torch.device("cpu"))


# ---- GPU: ViT-B/16 shapes, compiled kernel ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n_experts,k", [(12, 4), (12, 8), (64, 4), (64, 8), (256, 4), (256, 8)])
def test_gpu_vit_b16_routing_matches_the_reference(n_experts, k, dtype, mode):
    """32 samples' [CLS] tokens of width 768, as a ViT-B/16 layer routes them (every 197th row of its input)."""
    tokens, weight, bias = _integer_inputs(32, 768, n_experts, dtype, torch.device("cuda"), seed=n_experts)
    rows = torch.zeros(32, 197, 768, device="cuda", dtype=dtype)
    rows[:, 0] = tokens
    cls_tokens = rows.select(1, 0)
    counts = torch.zeros(n_experts, dtype=torch.int64, device="cuda")
    expected_counts = counts.clone()
    # The kernel rounds each exact fp32 score once; cuBLAS may reduce split-K partial sums in bf16 (torch's default),
    # rounding scores above 256 twice and moving ties. The reference must round once too.
    matmul = torch.backends.cuda.matmul
    reduced = (matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction)
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    try:
        expected, _ = route_reference(cls_tokens, weight, bias, k, mode, expected_counts)
    finally:
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = reduced
    assert torch.equal(triton_route(cls_tokens, weight, bias, k, mode, counts)[0], expected)
    assert torch.equal(counts, expected_counts)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sample", "batch"])
@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n_experts,k", [(12, 8), (64, 4), (256, 8)])
def test_gpu_vit_b16_learned_gates_and_router_gradient(n_experts, k, dtype, gate, mode):
    """32 samples' [CLS] tokens of width 768 (strided, as a layer's routing tokens are): gates and the router's
    gradient through them, by the tolerance rule."""
    _check_learned_gates(32, 768, n_experts, k, dtype, gate, mode, strided=True)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_counts():
    _compiled_counts_match_eager(torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_routing_captures_in_a_cuda_graph():
    """Replaying the captured routing chooses again and counts again, with no host sync inside."""
    tokens, weight, bias = _integer_inputs(32, 768, 64, torch.bfloat16, torch.device("cuda"))
    counts = torch.zeros(64, dtype=torch.int64, device="cuda")
    expected, _ = route_reference(tokens, weight, bias, 8, "sample")
    triton_route(tokens, weight, bias, 8, "sample", counts)  # compile outside the capture
    counts.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, _ = triton_route(tokens, weight, bias, 8, "sample", counts)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(idx, expected)
    assert int(counts.sum()) == 3 * 32 * 8
