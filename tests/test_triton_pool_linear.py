"""The Triton pool linear against the reference: forward and every gradient, both variants, every dtype.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the CPU grid
is small odd shapes; the GPU-marked tests repeat the check at ViT-B/16 shapes and under torch.compile."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import triton
import triton.language as tl
from _tolerance import assert_close_by_rule

from rank1_kernels import FusedRank1PoolLinear, rank1_pool_linear, rank1_pool_linear_ref, resolve_backend
from rank1_kernels import pool_linear as pool_linear_module
from rank1_kernels import routing as routing_module
from rank1_kernels import triton_backend as triton_backend_module
from rank1_kernels import triton_pool_linear as triton_pool_linear_module
from rank1_kernels import triton_routing as triton_routing_module
from rank1_kernels.triton_pool_linear import (
    SHRINKS,
    VARIANTS,
    _rank_dot,
    _to,
    choose_shrink,
    choose_variant,
    is_interpreted,
    triton_pool_linear,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_NAMES = ("x", "A", "B", "gates", "lora_input")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(n_samples, tokens, d_in, d_out, r, k, with_bias, with_lora_input, device, seed=0):
    """fp64 inputs of the test; idx picks k distinct experts per sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples * tokens, d_in, generator=g, dtype=torch.float64)
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    bias = torch.randn(d_out, generator=g, dtype=torch.float64) if with_bias else None
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    per_sample = [torch.randperm(r, generator=g)[:k] for _ in range(n_samples)]
    idx = torch.stack(per_sample) if per_sample else torch.zeros(0, k, dtype=torch.int64)
    gates = torch.rand(n_samples, k, generator=g, dtype=torch.float64) + 0.5
    lora_input = torch.randn_like(x) if with_lora_input else None
    tensors = {"x": x, "weight": weight, "bias": bias, "A": A, "B": B, "idx": idx, "gates": gates}
    tensors["lora_input"] = lora_input
    return {name: (t.to(device) if t is not None else None) for name, t in tensors.items()}


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor in dtype with its strides: `.to()` would make a strided view (not dense) contiguous, and a test of
    non-contiguous inputs would then test contiguous ones."""
    if tensor.is_contiguous():
        return tensor.to(dtype)
    extent = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    buffer = torch.zeros(extent + 1, dtype=dtype, device=tensor.device)
    return buffer.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()).copy_(tensor)


def _run(fn, inputs, dtype, grad_y, scaling, tokens):
    """y and the gradients of (x, A, B, gates, lora_input) for fn run on the inputs cast to dtype (same strides)."""
    cast = {n: (_cast(t, dtype) if t is not None and t.is_floating_point() else t) for n, t in inputs.items()}
    trainable = [cast[n].requires_grad_() if cast[n] is not None else None for n in GRAD_NAMES]
    y = fn(cast["x"], cast["weight"], cast["bias"], cast["A"], cast["B"], cast["idx"], cast["gates"], scaling, tokens,
           cast["lora_input"])  # fmt: skip
    present = [t for t in trainable if t is not None]
    grads = iter(torch.autograd.grad(y, present, grad_y.to(dtype)))
    return y, [next(grads) if t is not None else None for t in trainable]


def _check_against_reference(inputs, dtype, scaling, tokens, variant, what, shrink="auto"):
    def triton_fn(*args):
        return triton_pool_linear(*args, variant=variant, shrink=shrink)

    grad_y = torch.randn(inputs["x"].shape[0], inputs["weight"].shape[0], dtype=torch.float64,
                         generator=torch.Generator().manual_seed(7)).to(inputs["x"].device)  # fmt: skip
    grad_y = grad_y.to(dtype).double()  # every run sees the same rounded upstream gradient
    y, grads = _run(triton_fn, inputs, dtype, grad_y, scaling, tokens)
    y_ref, grads_ref = _run(rank1_pool_linear_ref, inputs, dtype, grad_y, scaling, tokens)
    rounded = {n: (t.to(dtype).double() if t is not None and t.is_floating_point() else t) for n, t in inputs.items()}
    y_oracle, grads_oracle = _run(rank1_pool_linear_ref, rounded, torch.float64, grad_y, scaling, tokens)
    assert y.dtype == dtype
    assert_close_by_rule(y, y_ref, y_oracle, f"{what}: y")
    for name, grad, grad_ref, grad_oracle in zip(GRAD_NAMES, grads, grads_ref, grads_oracle):
        if grad_oracle is not None:
            assert grad is not None and grad.dtype == dtype, f"{what}: no {dtype} gradient for {name}"
            assert_close_by_rule(grad, grad_ref, grad_oracle, f"{what}: d{name}")


# (n_samples, tokens_per_sample, d_in, d_out, r, k, bias, lora_input): size 1, odd and prime sizes, k = 1 and k = r,
# samples longer than one 16-row tile.
CPU_SHAPES = [
    (3, 5, 17, 37, 7, 3, True, False),
    (2, 1, 1, 3, 1, 1, False, True),
    (2, 17, 37, 17, 5, 5, True, True),
    (2, 3, 5, 6, 75, 70, False, False),  # more choices than one 64-wide block of the gate gradient
]


def _shape_id(shape):
    return "x".join(map(str, shape[:6])) + ("-bias" if shape[6] else "") + ("-lora_input" if shape[7] else "")


@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=_shape_id)
def test_forward_and_gradients_match_reference(shape, dtype, variant, shrink):
    n_samples, tokens, d_in, d_out, r, k, with_bias, with_lora_input = shape
    inputs = _inputs(n_samples, tokens, d_in, d_out, r, k, with_bias, with_lora_input, _device())
    _check_against_reference(inputs, dtype, 0.3, tokens, variant, f"{variant} {shrink} {dtype} {shape}", shrink)


@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_non_contiguous_inputs(variant, shrink):
    """Every tensor a strided view: the kernels take strides, never assume a layout."""
    inputs = _inputs(3, 5, 11, 13, 6, 2, True, True, _device(), seed=3)

    for name in ("x", "bias", "A", "gates", "lora_input", "idx"):  # every other column of a wider buffer
        wide = torch.zeros(*inputs[name].shape[:-1], 2 * inputs[name].shape[-1] + 1, dtype=inputs[name].dtype,
                           device=inputs[name].device)  # fmt: skip
        wide[..., 1::2] = inputs[name]
        inputs[name] = wide[..., 1::2]
    for name in ("weight", "B"):  # column-major
        inputs[name] = inputs[name].t().contiguous().t()
    names = ("x", "weight", "bias", "A", "B", "idx", "gates", "lora_input")
    assert not any(_cast(inputs[n], torch.float32).is_contiguous() for n in names)
    _check_against_reference(inputs, torch.float32, 0.5, 5, variant, f"{variant} {shrink} non-contiguous", shrink)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter shows the wrap as a crash or a misread")
@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_column_offsets_beyond_int32(variant, shrink):
    """A column-major x has column stride n_rows: column * stride passes 2^31 elements at real sizes (4096 x 197
    tokens x 3072), and an int32 column index wrapped to a negative offset. Here x's last column sits at element
    2^31 of a 4 GiB fp16 storage (virtual: only the touched pages are allocated)."""
    inputs = _inputs(2, 2, 3, 5, 4, 2, False, False, _device(), seed=5)
    stride = 2**30
    storage = torch.empty(2 * stride + inputs["x"].shape[0], dtype=torch.float16)
    x = storage.as_strided(inputs["x"].shape, (1, stride))
    x.copy_(inputs["x"])
    others = [inputs[name] for name in ("weight", "bias", "A", "B", "idx", "gates")]
    half = [t.half() if t is not None and t.is_floating_point() else t for t in others]
    got = triton_pool_linear(x, *half, 0.5, 2, variant=variant, shrink=shrink)
    same = rank1_pool_linear_ref(x.contiguous(), *half, 0.5, 2)
    oracle = rank1_pool_linear_ref(inputs["x"], *others, 0.5, 2)
    assert_close_by_rule(got, same, oracle, f"{variant} {shrink} x with column offsets beyond int32")


@pytest.mark.parametrize("variant", VARIANTS)
def test_index_views_that_flatten_to_strided_views(variant):
    """idx as views whose flat form is itself a strided view, not a copy: the first column of a wider idx (k = 1),
    and one expert broadcast to every sample (stride 0). The dA/dB scatter reads idx as a flat table."""
    inputs = _inputs(4, 3, 8, 6, 40, 3, True, False, _device(), seed=4)
    first_column = {**inputs, "idx": inputs["idx"][:, :1], "gates": inputs["gates"][:, :1]}
    assert first_column["idx"].reshape(-1).stride() == (3,)
    _check_against_reference(first_column, torch.float32, 0.5, 3, variant, f"{variant} idx[:, :1]")
    broadcast = {**first_column, "idx": torch.full((1, 1), 7, device=_device()).expand(4, 1)}
    _check_against_reference(broadcast, torch.float32, 0.5, 3, variant, f"{variant} idx expanded")


@pytest.mark.parametrize("variant", ["gather", "mask"])
def test_variants_agree_with_shared_experts_and_are_deterministic(variant):
    """Samples sharing experts (batch routing) sum into the same rows of dA and columns of dB: the result must be
    the same bits on every run (no atomics)."""
    inputs = _inputs(4, 3, 9, 7, 5, 2, True, False, _device(), seed=5)
    inputs["idx"] = torch.tensor([[1, 3]] * 4, device=inputs["x"].device)
    _check_against_reference(inputs, torch.float32, 0.25, 3, variant, f"{variant} shared experts")

    def grads_once():
        x, A, B, gates = (inputs[n].float().requires_grad_() for n in ("x", "A", "B", "gates"))
        y = triton_pool_linear(x, inputs["weight"].float(), inputs["bias"].float(), A, B, inputs["idx"], gates, 0.25,
                               3, variant=variant)  # fmt: skip
        return torch.autograd.grad(y.square().sum(), (x, A, B, gates))

    for first, second in zip(grads_once(), grads_once()):
        assert torch.equal(first, second)


@triton.jit
def _rank_dot_probe(hidden_ptr, operand_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                    RANK_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):  # fmt: skip
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    hidden = tl.load(hidden_ptr + m[:, None] * K + k[None, :])
    operand = tl.load(operand_ptr + k[:, None] * N + n[None, :])
    out = _rank_dot(hidden, operand, tl.zeros((M, N), dtype=tl.float32), RANK_DOT, UPCAST_DOT)
    tl.store(out_ptr + m[:, None] * N + n[None, :], out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rank_products_keep_the_fp32_intermediate(dtype):
    """The expand and dA/dB multiply the fp32 rank intermediate by input-dtype tiles on tensor cores (bf16: three
    exact bf16 parts; fp16: tf32x3). Each operand column holds one power of two, so the true product is one exact
    fp32 number and no accumulation order can round it: bf16 (and fp32) must give it bit for bit, over magnitudes
    2^-30 to 2^30; fp16's tf32x3 keeps at least 21 significant bits. A bf16 layer output could not show a lost
    part, so the helper is checked on its own (dropping the smallest bf16 part fails)."""
    g = torch.Generator().manual_seed(21)
    scale = 2.0 ** torch.randint(-30, 30, (32, 1), generator=g).double()
    hidden = (torch.randn(32, 16, generator=g, dtype=torch.float64) * scale).float()
    rows_of_columns = torch.randint(0, 16, (32,), generator=g)  # the one nonzero row of each operand column
    powers = torch.randint(-4, 5, (32,), generator=g).double()
    signs = torch.randint(0, 2, (32,), generator=g).double() * 2 - 1
    operand = torch.zeros(16, 32, dtype=torch.float64)
    operand[rows_of_columns, torch.arange(32)] = signs * 2.0**powers
    expected = (hidden.double() @ operand).float()  # exact: one product of an fp32 and a power of two per entry
    out = torch.empty(32, 32, device=_device())
    config = triton_pool_linear_module._dot_config(dtype)
    _rank_dot_probe[(1,)](hidden.to(_device()), operand.to(dtype).to(_device()), out, 32, 16, 32,
                          RANK_DOT=triton_pool_linear_module._RANK_DOT[dtype],
                          UPCAST_DOT=config["UPCAST_DOT"])  # fmt: skip
    out = out.cpu()
    if dtype == torch.float16:
        relative = ((out.double() - expected.double()).abs() / expected.double().abs()).max()
        assert relative <= 2.0**-21, f"fp16 rank product keeps fewer than 21 bits: relative error {relative:.3e}"
    else:
        assert torch.equal(out, expected), f"{dtype} rank product is not exact: {(out - expected).abs().max()}"


@triton.jit
def _cast_probe(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, _to(tl.load(x_ptr + offsets, mask=offsets < n), out_ptr.dtype.element_ty),
             mask=offsets < n)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_outputs_round_to_nearest_even_as_torch_casts(dtype):
    """Every kernel stores its fp32 results through `_to`: rounded to nearest even, as torch's casts and the GPU's
    conversions round (Triton's interpreter alone truncates to bf16; `_to` rounds by bits there). Magnitudes 2^-140
    to 2^127 (bf16 subnormals, overflow to inf), ties, signed zeros, inf and NaN."""
    g = torch.Generator().manual_seed(5)
    values = torch.randn(4096, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-140, 128, (4096,), generator=g)
    ties = (torch.randint(1, 2**16, (256,), generator=g) * 2**16 + 2**15).to(torch.int32).view(torch.float32)
    special = torch.tensor([1.67107, 3.4028235e38, 3.3895314e38, -0.0, 0.0, float("inf"), -float("inf"), float("nan")])
    x = torch.cat([values.float(), ties, -ties, special])
    out = torch.empty(x.numel(), dtype=dtype, device=_device())
    _cast_probe[(1,)](x.to(_device()), out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(dtype)
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    same = (out.cpu().view(bits) == expected.view(bits)) | (out.cpu().isnan() & expected.isnan())
    assert same.all(), f"{int((~same).sum())} values cast differently, e.g. {x[~same][:4].tolist()}"


def test_bf16_layer_output_rounds_to_nearest_even():
    """y = 1 + 3 * 2^-9 is 3/4 of a bf16 step above 1: the reference's bf16 linear rounds it up to 1 + 2^-7; a
    truncating store would give 1."""
    x, weight = torch.ones(2, 1, dtype=torch.bfloat16), torch.ones(1, 1, dtype=torch.bfloat16)
    bias = torch.full((1,), 3 * 2.0**-9, dtype=torch.bfloat16)
    A, B = torch.ones(4, 1, dtype=torch.bfloat16), torch.zeros(1, 4, dtype=torch.bfloat16)
    idx, gates = torch.tensor([[0], [1]]), torch.ones(2, 1, dtype=torch.bfloat16)
    inputs = [t.to(_device()) for t in (x, weight, bias, A, B, idx, gates)]
    expected = rank1_pool_linear_ref(*inputs, 1.0, 1)
    assert expected.flatten().tolist() == [1 + 2.0**-7] * 2
    for variant in VARIANTS:
        assert torch.equal(triton_pool_linear(*inputs, 1.0, 1, variant=variant), expected), variant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_tiles_across_samples(dtype):
    """With the shrink separate, the gather variant's GEMM tiles run across samples (no row padded to a sample
    boundary): tiles holding parts of two or more samples, boundaries inside a sample, a short last tile. 29-token
    samples against 64-row tiles (fp32) or one 256-row tile holding all 5 samples (bf16); fused, tiles align."""
    inputs = _inputs(5, 29, 8, 9, 40, 3, True, False, _device(), seed=17)
    assert choose_variant(40, 3, 29) == "gather"
    for shrink in SHRINKS:
        _check_against_reference(inputs, dtype, 0.5, 29, "gather", f"gather {shrink} {dtype} across samples", shrink)


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_expert_chosen_twice_by_one_sample_counts_twice(variant):
    """Duplicates in a sample's idx add their gates (the reference's sum over k). The mask variant builds its dense
    gates inside the kernels: each expert's gate is the sum of the gates choosing it."""
    inputs = _inputs(3, 4, 7, 6, 5, 3, True, False, _device(), seed=19)
    inputs["idx"] = torch.tensor([[2, 2, 0], [4, 1, 4], [3, 3, 3]], device=inputs["x"].device)
    for shrink in SHRINKS:
        _check_against_reference(inputs, torch.float32, 0.5, 4, variant, f"{variant} {shrink} duplicates", shrink)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_gradient_entry_is_written(monkeypatch, variant):
    """Gradient buffers start uninitialized (no memset): filled with NaN here, any entry a kernel leaves unwritten
    (an unchosen expert's row of dA, a padding row of dx) would show as NaN."""
    monkeypatch.setattr(triton_pool_linear_module, "_unwritten_like", lambda t: torch.full_like(t, float("nan")))
    inputs = _inputs(3, 5, 17, 37, 9, 2, True, True, _device(), seed=23)  # most of the 9 experts unchosen
    for shrink in SHRINKS:
        _check_against_reference(inputs, torch.float32, 0.3, 5, variant, f"{variant} {shrink} NaN-filled", shrink)


@pytest.mark.parametrize("d_in,d_out", [(5, 0), (0, 5)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_layers_without_input_or_output_features(monkeypatch, variant, d_in, d_out):
    """d_out = 0 (forward) or d_in = 0 (the backward's dx GEMM) leaves a GEMM without tiles, so the rank activations
    cannot be computed in its K loop; the shrink kernel computes them. Fresh buffers are NaN-filled here: an
    activation left unwritten would reach dgates."""
    real_empty = torch.empty

    def nan_filled(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(triton_pool_linear_module.torch, "empty", nan_filled)
    inputs = _inputs(2, 3, d_in, d_out, 4, 2, False, False, _device(), seed=29)
    for shrink in SHRINKS:
        _check_against_reference(inputs, torch.float32, 0.5, 3, variant, f"{variant} {shrink} {d_in}->{d_out}", shrink)


def test_mask_variant_row_chunks(monkeypatch):
    """The mask variant sums dA and dB over row chunks; small chunks make these shapes cross chunk boundaries, with
    a short last chunk and chunks that split samples."""
    monkeypatch.setattr(triton_pool_linear_module, "_MASK_ROW_CHUNK", 16)
    monkeypatch.setattr(triton_pool_linear_module, "_MASK_MAX_CHUNKS", 2)  # 37 rows: 2 chunks of 19 and 18 rows
    inputs = _inputs(1, 37, 5, 6, 3, 2, False, False, _device(), seed=13)
    _check_against_reference(inputs, torch.float32, 0.5, 37, "mask", "mask, 2 row chunks")
    monkeypatch.setattr(triton_pool_linear_module, "_MASK_MAX_CHUNKS", 16)  # 3 chunks of 16, 16 and 5 rows
    inputs = _inputs(37, 1, 5, 6, 3, 2, True, True, _device(), seed=14)
    _check_against_reference(inputs, torch.float32, 0.5, 1, "mask", "mask, 3 row chunks")


def test_empty_batch():
    inputs = _inputs(0, 3, 5, 4, 3, 2, True, False, _device())
    x = inputs["x"].float().requires_grad_()
    A = inputs["A"].float().requires_grad_()
    y = triton_pool_linear(x, inputs["weight"].float(), inputs["bias"].float(), A, inputs["B"].float(), inputs["idx"],
                           inputs["gates"].float(), 1.0, 3)  # fmt: skip
    assert y.shape == (0, 4)
    grad_x, grad_A = torch.autograd.grad(y.sum(), (x, A))
    assert grad_x.shape == (0, 5) and torch.equal(grad_A, torch.zeros_like(A))


def test_dispatcher_picks_by_pool_size_and_sample_length():
    assert choose_variant(12, 8, 197) == "mask"  # the paper's pool: small r
    assert choose_variant(256, 4, 197) == "gather"  # a large pool, few experts per sample
    assert choose_variant(256, 200, 197) == "mask"  # most experts chosen anyway
    assert choose_variant(256, 4, 1) == "mask"  # one token per sample cannot fill a sample-aligned tile
    rows, bf16 = 32 * 197, torch.bfloat16
    # The mask variant (one group of all rows): the cost is the shrink each column tile repeats.
    assert choose_shrink(12, 768, 768, rows, rows, bf16) == "fused"  # 6 column tiles repeat a 16-wide shrink
    assert choose_shrink(12, 768, 3072, rows, rows, bf16) == "fused"  # mlp.c_proj, and every backward to 768
    assert choose_shrink(12, 3072, 768, rows, rows, bf16) == "separate"  # 24 column tiles: cheaper to read x again
    assert choose_shrink(40, 768, 768, rows, rows, bf16) == "separate"  # more slots than the registers hold
    # The gather variant: fused tiles stop at sample boundaries, 197 tokens pad to 256 rows.
    assert choose_shrink(8, 768, 768, 197, rows, bf16) == "separate"
    assert choose_shrink(8, 768, 768, 256, 32 * 256, bf16) == "fused"  # samples a whole number of tiles
    with pytest.raises(ValueError, match="variant='dense' is not supported"):
        inputs = _inputs(1, 1, 2, 2, 2, 1, False, False, _device())
        triton_pool_linear(*(inputs[n] for n in ("x", "weight", "bias", "A", "B", "idx", "gates")), 1.0, 1,
                           variant="dense")  # fmt: skip


def test_backend_by_name_and_refusals():
    inputs = _inputs(2, 3, 6, 5, 4, 2, True, False, _device())
    args = [inputs[n] for n in ("x", "weight", "bias", "A", "B", "idx", "gates")]
    with pytest.raises(RuntimeError, match=r"float64 is not supported.*backend='reference'"):
        rank1_pool_linear(*args, 0.5, 3, backend="triton")
    floats = [t.float() if t.is_floating_point() else t for t in args]
    torch.testing.assert_close(
        rank1_pool_linear(*floats, 0.5, 3, backend="triton"), rank1_pool_linear_ref(*floats, 0.5, 3), rtol=1e-5,
        atol=1e-5,
    )  # fmt: skip
    floats[1] = floats[1].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="keep the base weight and bias frozen"):
        rank1_pool_linear(*floats, 0.5, 3, backend="triton")
    with torch.no_grad():  # a weight that requires grad is fine when no graph is built
        rank1_pool_linear(*floats, 0.5, 3, backend="triton")
    floats[1] = floats[1].detach()
    expected = "triton" if floats[0].is_cuda and not is_interpreted() else "reference"
    assert resolve_backend("auto", "pool_linear", floats).name == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal without the interpreter")
def test_fresh_process_compiles_auto_and_refuses_cpu_without_interpreter():
    """In a fresh process the Triton backend is first imported by "auto" inside a compiled region: that must not
    break fullgraph. Without TRITON_INTERPRET=1, CPU tensors are refused with the fix named."""
    script = (
        "import sys, torch, rank1_kernels as rk\n"
        "layer = rk.FusedRank1PoolLinear(6, 4, r=3, k=2)\n"
        "torch.compile(layer, fullgraph=True)(torch.randn(2, 3, 6)).sum().backward()\n"
        "assert 'rank1_kernels.triton_backend' in sys.modules\n"
        "x = torch.randn(2, 3); w = torch.randn(4, 3); A = torch.randn(2, 3); B = torch.randn(4, 2)\n"
        "idx = torch.zeros(2, 1, dtype=torch.int64); g = torch.ones(2, 1)\n"
        "assert rk.resolve_backend('auto', 'pool_linear', [x, w, A, B, idx, g]).name == 'reference'\n"
        "try:\n    rk.rank1_pool_linear(x, w, None, A, B, idx, g, 1.0, 1, backend='triton')\n"
        "except RuntimeError as e:\n    print(e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout and "backend='reference'" in result.stdout, result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves")
def test_kernels_compile_for_a_gpu_without_one(tmp_path):
    """tests/triton_aot.py: every kernel compiled for sm_80 and sm_90, and the fused GEMM's resources checked there
    (no register spills, a pipelined K loop, half-precision rank products on tensor cores)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    # A guard against a hang, not a speed check: compiling every kernel for two archs took 7 to over 10 minutes on
    # the 2-core CI machine, depending on its load.
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1500,
                            check=False)  # fmt: skip
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck(variant, shrink, layout):
    """opcheck compares the fakes' strides with the kernels' outputs too: a column-major x must give the fake's
    layout of dx (a mismatch failed compiled backwards)."""
    inputs = _inputs(2, 3, 5, 7, 4, 2, True, True, _device(), seed=9)
    f = {n: (t.float() if t is not None and t.is_floating_point() else t) for n, t in inputs.items()}
    if layout == "column-major":
        f = {n: (t.t().contiguous().t() if t is not None and t.dim() == 2 else t) for n, t in f.items()}
    for name in ("x", "A", "B", "gates", "lora_input"):
        f[name].requires_grad_()
    forward_args = (f["x"], f["weight"], f["bias"], f["A"], f["B"], f["idx"], f["gates"], 0.5, 3, f["lora_input"],
                    variant, shrink)  # fmt: skip
    torch.library.opcheck(torch.ops.rank1.triton_pool_linear_fwd.default, forward_args)
    with torch.no_grad():
        _, u = torch.ops.rank1.triton_pool_linear_fwd(*forward_args)
    grad_y = torch.randn(6, 7, device=u.device)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in forward_args]
    backward_args = (grad_y, detached[0], detached[1], detached[3], detached[4], detached[5], detached[6], 0.5, 3,
                     detached[9], u, variant, shrink, True, True, True, True, True)  # fmt: skip
    torch.library.opcheck(torch.ops.rank1.triton_pool_linear_bwd.default, backward_args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_function_and_registered_op_compute_the_same_bits(variant):
    """Eager mode runs the ops' bodies through `_EagerPoolLinear` (no dispatcher); torch.compile traces the
    registered ops. Both must give the same output and gradients, bit for bit."""
    inputs = _inputs(3, 5, 7, 6, 9, 3, True, True, _device(), seed=29)
    grad_y = torch.randn(15, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(_device())

    def registered(*args):
        return torch.ops.rank1.triton_pool_linear_fwd(*args, variant, "auto")[0]

    def eager(*args):
        y = triton_pool_linear(*args, variant=variant)
        assert type(y.grad_fn).__name__ == "_EagerPoolLinearBackward"
        return y

    (y_op, grads_op), (y_eager, grads_eager) = (_run(fn, inputs, torch.float32, grad_y, 0.5, 5)
                                                for fn in (registered, eager))  # fmt: skip
    assert torch.equal(y_op, y_eager)
    for name, grad_op, grad_eager in zip(GRAD_NAMES, grads_op, grads_eager):
        assert torch.equal(grad_op, grad_eager), name


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("wanted", ["A", "B"])
def test_one_expert_gradient_alone(variant, wanted):
    """dA and dB share their launches; with only one asked for, that one runs alone (and the other is not
    computed)."""
    inputs = _inputs(3, 5, 7, 6, 9, 3, True, False, _device(), seed=31)
    grad_y = torch.randn(15, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(_device())

    def grad_of(fn, dtype):
        cast = {n: (t.to(dtype) if t is not None and t.is_floating_point() else t) for n, t in inputs.items()}
        param = cast[wanted].requires_grad_()
        y = fn(cast["x"], cast["weight"], cast["bias"], cast["A"], cast["B"], cast["idx"], cast["gates"], 0.5, 5)
        return torch.autograd.grad(y, [param], grad_y.to(dtype))[0]

    actual = grad_of(lambda *args: triton_pool_linear(*args, variant=variant), torch.float32)
    reference, oracle = grad_of(rank1_pool_linear_ref, torch.float32), grad_of(rank1_pool_linear_ref, torch.float64)
    assert_close_by_rule(actual, reference, oracle, f"{variant}: d{wanted} alone")


def test_double_backward_is_refused_not_silently_wrong():
    """The kernels' gradients carry no graph of their own: differentiating them again must raise."""
    layer = FusedRank1PoolLinear(6, 4, r=5, k=2, backend="triton").to(_device())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 6, requires_grad=True, device=_device())
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.sum().backward()


def test_constant_gates_are_shared_read_only_ones_that_survive_inference_mode():
    """gate="none" gates are expanded views of one cached tensor of ones (no fill launch per layer call). First made
    under inference_mode, they must still serve a training step (the kernels save gates for backward, which an
    inference tensor refuses); an in-place write to them must raise rather than change every layer's gates."""
    routing_module._ONES.clear()
    layer = FusedRank1PoolLinear(8, 5, r=6, k=3, backend="triton")
    x = torch.randn(2, 4, 8, device=_device())
    layer.to(x.device)
    with torch.inference_mode():
        layer.eval()(x)
    assert routing_module._ONES, "the cache was not used"
    layer.train()(x.requires_grad_()).square().sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None
    _, gates = routing_module.route(x[:, 0].detach(), layer.router.weight, layer.router.bias, 3)
    assert torch.equal(gates, torch.ones(2, 3, device=x.device)) and gates.stride() == (0, 0)
    with pytest.raises(RuntimeError, match="more than one element"):
        gates.mul_(2)


# ---- host side: what one layer call launches -----------------------------------------------------------------------

# Torch ops that launch no device work: views, metadata and uninitialised allocations.
_NO_LAUNCH = {
    *("view", "_unsafe_view", "t", "transpose", "select", "slice", "expand", "detach", "as_strided", "reshape"),
    *("alias", "unsqueeze", "squeeze", "promote_types", "empty", "empty_like", "new_empty", "empty_strided"),
}
_KERNELS = {
    triton_pool_linear_module: ("_shrink_kernel", "_fused_linear_kernel", "_group_outer_kernel", "_gate_grad_kernel",
                                "_scatter_slots_kernel"),
    triton_routing_module: ("_route_kernel", "_router_grad_kernel"),
}  # fmt: skip


class _DeviceWork(TorchDispatchMode):
    """Records the name of every torch op that launches device work and of every Triton kernel launched (the
    kernels are replaced by recorders: only the host side runs)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.launches: list[str] = []
        for module, names in _KERNELS.items():
            for name in names:
                monkeypatch.setattr(module, name, _LaunchRecorder(name, self.launches))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.launches.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class _LaunchRecorder:
    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


@pytest.mark.parametrize("routing", ["sample", "batch"])
@pytest.mark.parametrize("r,variant", [(64, "gather"), (12, "mask")])
def test_launches_per_layer_call(monkeypatch, r, variant, routing):
    """In eager mode every launch costs host time (docs/TRITON.md, "Host time in eager mode"), so this pins them. A
    training forward (gate "none") is two kernels: the routing (scores, top k and activation counts) and the fused
    linear; no torch op launches, not even a fill for the constant gates. The backward is three kernels: no memset,
    no copy of idx, dA and dB in the same launches. The checks that read values back (finite routing scores, expert
    range) are off here, as they are on a GPU by default."""
    monkeypatch.setattr(triton_backend_module, "_may_read_back", lambda tensor: False)
    monkeypatch.setattr(pool_linear_module, "check_expert_range", lambda idx, n_experts: None)
    layer = FusedRank1PoolLinear(6, 4, r=r, k=3, routing=routing, backend="triton").train()
    x = torch.randn(3, 20, 6, requires_grad=True)
    assert choose_variant(r, 3, 20) == variant and choose_shrink(3 if variant == "gather" else r, 4, 6, 20, 60,
                                                                 torch.float32) == "fused"  # fmt: skip
    layer(x)  # the first call fills the caches (constant ones, launch plans)
    with _DeviceWork(monkeypatch) as work:
        y = layer(x)
    assert sorted(work.launches) == ["_fused_linear_kernel", "_route_kernel"]
    grad_y = torch.ones_like(y)
    with _DeviceWork(monkeypatch) as work:
        torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), grad_y)
    # dx and dy B_S in one fused launch; dA and dB together: per-group outer products, then per-expert sums.
    assert sorted(work.launches) == ["_fused_linear_kernel", "_group_outer_kernel", "_scatter_slots_kernel"]


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_learned_gates_launch_no_torch_op_either(monkeypatch, gate):
    """The routing kernel writes learned gates too: the forward stays the routing kernel and the fused linear. The
    backward adds the gates' gradient and the router's gradient through them, one kernel each."""
    monkeypatch.setattr(triton_backend_module, "_may_read_back", lambda tensor: False)
    monkeypatch.setattr(pool_linear_module, "check_expert_range", lambda idx, n_experts: None)
    layer = FusedRank1PoolLinear(6, 4, r=12, k=3, gate=gate, backend="triton").train()
    x = torch.randn(3, 20, 6, requires_grad=True)
    layer(x)
    with _DeviceWork(monkeypatch) as work:
        y = layer(x)
    assert sorted(work.launches) == ["_fused_linear_kernel", "_route_kernel"]
    params, grad_y = (x, layer.lora_A, layer.lora_B, layer.router.weight, layer.router.bias), torch.ones_like(y)
    with _DeviceWork(monkeypatch) as work:
        torch.autograd.grad(y, params, grad_y)
    # select_backward and add are autograd's: x's gradient through its routing rows x[:, 0], widened to x's shape and
    # added to the linear's dx (docs/TRITON.md, "Host time in eager mode", says what that costs).
    assert sorted(work.launches) == ["_fused_linear_kernel", "_gate_grad_kernel", "_group_outer_kernel",
                                     "_router_grad_kernel", "_scatter_slots_kernel", "add",
                                     "select_backward"]  # fmt: skip


def _pool_layer(backend, device, dtype=torch.float32):
    torch.manual_seed(11)
    layer = FusedRank1PoolLinear(10, 7, r=6, k=3, gate="softmax", backend=backend, device=device, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _compile_matches_eager(device):
    layer = _pool_layer("triton", device)
    reference = copy.deepcopy(layer)
    reference.backend = "reference"
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 5, 10, device=device)
    oracle_layer = copy.deepcopy(reference).double()
    oracle = oracle_layer(x.double())
    assert_close_by_rule(compiled(x), reference(x), oracle, "compiled triton forward")
    compiled(x).square().sum().backward()
    reference(x).square().sum().backward()
    oracle_layer(x.double()).square().sum().backward()
    for name in ("lora_A", "lora_B"):
        assert_close_by_rule(getattr(layer, name).grad, getattr(reference, name).grad,
                             getattr(oracle_layer, name).grad, f"compiled d{name}")  # fmt: skip
    assert_close_by_rule(layer.router.weight.grad, reference.router.weight.grad, oracle_layer.router.weight.grad,
                         "compiled router gradient (through the gates)")  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU variant below runs instead")
def test_torch_compile_fullgraph_on_cpu_interpreter():
    _compile_matches_eager(torch.device("cpu"))


# ---- GPU: ViT-B/16 shapes, compiled kernels ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["gather", "mask"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("d_out", [768, 2304, 3072])
@pytest.mark.parametrize("r,k", [(12, 4), (12, 8), (64, 4), (64, 8), (256, 4), (256, 8)])
def test_vit_b16_shapes_on_gpu(r, k, d_out, dtype, variant):
    inputs = _inputs(32, 197, 768, d_out, r, k, True, True, torch.device("cuda"), seed=r + k)
    _check_against_reference(inputs, dtype, 1.0 / r, 197, variant, f"ViT {variant} {dtype} d_out={d_out} r={r} k={k}")


# Each placement forced where it exists (a 64-expert mask has more slots than the fused shrink holds).
_PLACEMENTS = [(r, k, variant, shrink) for r, k in ((12, 8), (64, 8)) for variant in VARIANTS for shrink in SHRINKS
               if not (variant == "mask" and shrink == "fused" and r > 32)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("r,k,variant,shrink", _PLACEMENTS)
def test_vit_b16_both_shrink_placements_on_gpu(r, k, variant, shrink, dtype):
    """"auto" picks one placement per shape above; here each is forced (gather + fused aligns tiles to samples)."""
    inputs = _inputs(32, 197, 768, 768, r, k, True, False, torch.device("cuda"), seed=r * k)
    _check_against_reference(inputs, dtype, 1.0 / r, 197, variant, f"ViT {variant} {shrink} {dtype} r={r} k={k}",
                             shrink)  # fmt: skip


@pytest.mark.gpu
def test_torch_compile_fullgraph_on_gpu():
    assert not is_interpreted(), "GPU tests expect compiled kernels; unset TRITON_INTERPRET"
    _compile_matches_eager(torch.device("cuda"))


@pytest.mark.gpu
def test_auto_picks_triton_on_gpu_and_the_forward_captures_in_a_cuda_graph():
    layer = _pool_layer("auto", torch.device("cuda"), torch.bfloat16).eval()
    x = torch.randn(4, 197, 10, device="cuda", dtype=torch.bfloat16)
    idx = torch.zeros(4, 3, dtype=torch.int64, device="cuda")
    gates = torch.ones(4, 3, device="cuda", dtype=torch.bfloat16)
    args = [x.reshape(-1, 10), layer.weight, layer.bias, layer.lora_A, layer.lora_B, idx, gates]
    assert resolve_backend("auto", "pool_linear", args).name == "triton"
    with torch.no_grad():
        expected = layer(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(x)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, expected)


@pytest.mark.gpu
def test_constant_ones_first_needed_inside_a_cuda_graph_capture():
    """Captured, a fill runs only on replay: the cache of constant ones must not be filled during a capture."""
    layer = FusedRank1PoolLinear(10, 7, r=6, k=3, backend="triton", device="cuda", dtype=torch.bfloat16).train()
    x = torch.randn(4, 33, 10, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_()  # so that the output depends on the gates
        expected = layer(x)  # compiles the kernels outside the capture
        counts_before = layer.activation_counts.clone()
        routing_module._ONES.clear()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(x)
        assert not routing_module._ONES
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, expected)
    assert int((layer.activation_counts - counts_before).sum()) == 4 * 3  # the replay added one per choice


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_layer_on_another_gpu_than_the_current_one():
    """Triton launches on the current device: the backend guards the device of the inputs (cuda:1 while cuda:0 is
    current), forward and backward, routing and the AGO loss included."""
    torch.cuda.set_device(0)
    layer = FusedRank1PoolLinear(32, 48, r=12, k=4, gate="softmax", backend="triton").to("cuda:1").train()
    torch.nn.init.normal_(layer.lora_B)
    reference = copy.deepcopy(layer)
    reference.backend = "reference"
    x = torch.randn(3, 7, 32, device="cuda:1")
    for module in (layer, reference):
        module(x).square().sum().backward()
    oracle = copy.deepcopy(reference).double()
    oracle.zero_grad()
    oracle(x.double()).square().sum().backward()
    for name in ("lora_A", "lora_B"):
        assert_close_by_rule(getattr(layer, name).grad, getattr(reference, name).grad, getattr(oracle, name).grad,
                             f"cuda:1 d{name}")  # fmt: skip
