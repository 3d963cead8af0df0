"""The CUDA backend's correctness checks, written once for any device that runs the rank1::cuda_* ops: a GPU
(tests/test_cuda_backend.py, marked `gpu`) and the host emulation of the kernels on CPU tensors
(tests/cuda_emulation/kernel_checks.py). Every check compares against the reference ops by the tolerance rule."""

from __future__ import annotations

import copy

import torch
from _tolerance import assert_close_by_rule

import rank1_kernels

# (n samples, T tokens per sample, d_in, d_out, r, k): size-1, odd and prime sizes, k == r, and (GPU only) ViT-B/16.
# The last small shapes cross the CUDA kernels' chunk sizes (csrc/pool_linear_kernels.cu): more than 256 output
# columns, a depth of more than 64 (the shrink's tile), more than 16 slots (17 = 16 + 1), more than 32 and 64 tokens
# per sample (65 = 64 + 1).
SMALL_POOL_SHAPES = [(1, 1, 1, 1, 1, 1), (3, 5, 17, 37, 7, 3), (5, 3, 33, 65, 12, 12), (2, 7, 40, 300, 64, 8),
                     (3, 65, 19, 260, 40, 17), (2, 70, 67, 11, 24, 24)]  # fmt: skip
# ViT-B/16 widths with few tokens: the kernels' accumulation over a realistic depth, cheap enough for the emulation.
DEEP_POOL_SHAPES = [(2, 9, 768, 3072, 64, 8), (1, 12, 3072, 768, 256, 8)]
VIT_POOL_SHAPES = [(2, 197, 768, 768, 12, 8), (4, 197, 768, 3072, 64, 4), (2, 50, 3072, 768, 256, 8)]

# AGO layers: (d_out, r_cur, r_prev); r_prev == 0 is a layer with no history yet.
SMALL_AGO_LAYERS = [(40, 12, 8), (65, 7, 0), (33, 12, 20), (1, 1, 1)]
VIT_AGO_LAYERS = [(768, 12, 8), (3072, 12, 0), (512, 12, 44), (1, 1, 1)]


def pool_case(device, n, T, d_in, d_out, r, k, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n * T, d_in, device=device, generator=g)
    weight = torch.randn(d_out, d_in, device=device, generator=g) / d_in**0.5
    bias = torch.randn(d_out, device=device, generator=g)
    A = torch.randn(r, d_in, device=device, generator=g) / d_in**0.5
    B = torch.randn(d_out, r, device=device, generator=g)
    scores = torch.rand(n, r, device=device, generator=g)
    idx = scores.argsort(dim=1)[:, :k].contiguous()
    gates = torch.rand(n, k, device=device, generator=g) + 0.5
    return [t.to(dtype) if t.is_floating_point() else t for t in (x, weight, bias, A, B, idx, gates)]


def _assert_cuda_matches_reference(run, cast, names, label):
    """run(backend, cast) -> outputs; the cuda outputs against the reference in the same dtype (`cast`) and an fp64
    oracle, by the tolerance rule. Returns the cuda outputs."""
    oracle = run("reference", lambda t: t.detach().double())
    same = run("reference", cast)
    got = run("cuda", cast)
    for name, a, s, o in zip(names, got, same, oracle):
        assert_close_by_rule(a, s, o, f"{label} {name}")
    return got


def check_pool_linear(device, dtype, shape, with_lora_input):
    """Forward and every gradient (dx, dA, dB, dgates, d lora_input) of backend='cuda' against the reference."""
    n, T, d_in, d_out, r, k = shape
    x, weight, bias, A, B, idx, gates = pool_case(device, n, T, d_in, d_out, r, k, dtype)
    lora_input = torch.randn_like(x) if with_lora_input else None
    leaves = [x, A, B, gates] + ([lora_input] if with_lora_input else [])

    def run(backend, cast):
        inputs = [cast(t).requires_grad_() for t in leaves]
        xs, As, Bs, gs, *rest = inputs
        y = rank1_kernels.rank1_pool_linear(
            xs, cast(weight), cast(bias), As, Bs, idx, gs, 0.25, T, rest[0] if rest else None, backend=backend
        )
        dy = torch.ones_like(y) * torch.linspace(-1, 1, y.shape[-1], device=device, dtype=y.dtype)
        return [y, *torch.autograd.grad(y, inputs, dy)]

    names = ("y", "dx", "dA", "dB", "dgates", "d_lora_input")
    got = _assert_cuda_matches_reference(run, lambda t: t.detach().clone(), names, f"cuda {dtype} {shape}")
    # Only the chosen experts receive gradient.
    unchosen = torch.ones(r, dtype=torch.bool, device=device)
    unchosen[idx.reshape(-1)] = False
    assert not got[2][unchosen].any() and not got[3][:, unchosen].any(), "gradient reached an unchosen expert"


def check_partial_gradients(device):
    """Autograd asks the backward op for the gradients it needs only (a frozen model's first pool layer needs no dx,
    fixed gates no dgates): each subset gives the same bits as the full backward and the op leaves the rest empty."""
    x, weight, bias, A, B, idx, gates = pool_case(device, 3, 5, 17, 21, 7, 3, torch.float32)
    for lora_input in (None, torch.randn_like(x)):
        leaves = {"x": x, "A": A, "B": B, "gates": gates, **({"lora_input": lora_input} if lora_input is not None else {})}
        dy = torch.randn(x.shape[0], weight.shape[0], device=device)

        def grads(wanted):
            inputs = {name: t.detach().clone().requires_grad_(name in wanted) for name, t in leaves.items()}
            y = rank1_kernels.rank1_pool_linear(inputs["x"], weight, bias, inputs["A"], inputs["B"], idx,
                                                inputs["gates"], 0.5, 5, inputs.get("lora_input"), backend="cuda")  # fmt: skip
            got = torch.autograd.grad(y, [inputs[name] for name in wanted], dy)
            return dict(zip(wanted, got))

        full = grads(list(leaves))
        for wanted in (["x"], ["A"], ["B"], ["gates"], ["A", "B"], ["x", "gates"]) + ((["lora_input"],) if lora_input is not None else ()):  # fmt: skip
            for name, grad in grads(wanted).items():
                assert torch.equal(grad, full[name]), f"d{name} alone differs from the full backward ({wanted})"
    with torch.no_grad():
        y, u = torch.ops.rank1.cuda_pool_linear_fwd(x, weight, bias, A, B, idx, gates, 0.5, 5, None)
        outputs = torch.ops.rank1.cuda_pool_linear_bwd(
            torch.randn_like(y), x, weight, A, B, idx, gates, u, 0.5, 5, None, False, False, True, False, False
        )
    assert [t.numel() for t in outputs] == [0, 0, A.numel(), 0, 0], "gradients nobody asked for were computed"


def check_ago(device, dtype, p, layers):
    """The grouped AGO losses and their gradients w.r.t. every B_cur against the reference."""
    g = torch.Generator(device=device).manual_seed(1)
    curs = [torch.randn(d, r, device=device, generator=g) for d, r, _ in layers]
    prevs = [torch.randn(d, m, device=device, generator=g) for d, _, m in layers]
    masks = [torch.rand(r, device=device, generator=g) > 0.5 for _, r, _ in layers]
    prev_masks = [torch.rand(m, device=device, generator=g) > 0.3 for _, _, m in layers]

    def run(backend, cast):
        leaves = [cast(t).requires_grad_() for t in curs]
        losses = rank1_kernels.ago_loss_grouped(leaves, [cast(t) for t in prevs], masks, prev_masks, p, backend=backend)
        return [losses, *torch.autograd.grad(losses.sum(), leaves)]

    names = ["losses"] + [f"d_cur[{i}]" for i in range(len(layers))]
    _assert_cuda_matches_reference(run, lambda t: t.detach().to(dtype), names, f"cuda AGO {dtype} p={p}")


def check_ago_table_first_made_under_inference_mode(device):
    """An evaluation that logs the AGO penalty under inference_mode may be the first call for some layer shapes: the
    op's cached device table must still serve the training steps after it."""
    layers = [(13, 3, 2), (6, 3, 1)]  # shapes no other check uses: the inference_mode call makes the table
    with torch.inference_mode():
        g = torch.Generator(device=device).manual_seed(3)
        rank1_kernels.ago_loss_grouped(
            [torch.randn(d, r, device=device, generator=g) for d, r, _ in layers],
            [torch.randn(d, m, device=device, generator=g) for d, _, m in layers],
            [torch.ones(r, dtype=torch.bool, device=device) for _, r, _ in layers],
            [torch.ones(m, dtype=torch.bool, device=device) for _, _, m in layers], 1, backend="cuda",
        )  # fmt: skip
    check_ago(device, torch.float32, 1, layers)


def check_ago_prev_gradient(device, p):
    """B_prev is frozen history in training, but the op also differentiates it when asked (e.g. for gradcheck-style
    use): both gradients against the reference."""
    g = torch.Generator(device=device).manual_seed(2)
    curs = [torch.randn(9, 5, device=device, generator=g), torch.randn(4, 3, device=device, generator=g)]
    prevs = [torch.randn(9, 6, device=device, generator=g), torch.randn(4, 2, device=device, generator=g)]
    masks = [
        torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool, device=device),
        torch.ones(3, dtype=torch.bool, device=device),
    ]
    prev_masks = [
        torch.tensor([0, 1, 1, 1, 0, 1], dtype=torch.bool, device=device),
        torch.ones(2, dtype=torch.bool, device=device),
    ]

    def run(backend, cast):
        leaves = [cast(t).requires_grad_() for t in curs + prevs]
        losses = rank1_kernels.ago_loss_grouped(leaves[:2], leaves[2:], masks, prev_masks, p, backend=backend)
        return [losses, *torch.autograd.grad(losses.sum(), leaves)]

    names = ["losses", "d_cur[0]", "d_cur[1]", "d_prev[0]", "d_prev[1]"]
    _assert_cuda_matches_reference(run, lambda t: t.detach().clone(), names, f"cuda AGO with B_prev gradient p={p}")


def check_opcheck(device):
    """torch.library.opcheck on the four ops, forward and backward of the pool linear and of the grouped AGO (schema,
    fake implementation, autograd registration)."""
    x, weight, bias, A, B, idx, gates = pool_case(device, 2, 9, 32, 48, 12, 4, torch.float32)
    column_major = {"lora_input": torch.randn_like(x).t().contiguous().t().requires_grad_(), "x": x.t().contiguous().t(),
                    "A": A.t().contiguous().t(), "B": B.t().contiguous().t()}  # fmt: skip
    cases = [(None, x, A, B), (torch.randn_like(x).requires_grad_(), x, A, B),
             # The bindings make inputs contiguous, so the fakes must say every gradient is row-major.
             (column_major["lora_input"], column_major["x"], column_major["A"], column_major["B"])]  # fmt: skip
    for lora_input, x, A, B in cases:
        args = (x.clone().requires_grad_(), weight, bias, A.clone().requires_grad_(), B.clone().requires_grad_(), idx,
                gates.clone().requires_grad_(), 0.5, 9, lora_input)  # fmt: skip
        torch.library.opcheck(torch.ops.rank1.cuda_pool_linear_fwd, args)
        with torch.no_grad():
            y, u = torch.ops.rank1.cuda_pool_linear_fwd(*args)
            lora = None if lora_input is None else lora_input.detach()
            needs = [(True, lora is not None, True, True, True), (False, False, True, True, False)]
        for need in needs:
            backward_args = (torch.randn_like(y), x, weight, A, B, idx, gates, u, 0.5, 9, lora, *need)
            torch.library.opcheck(torch.ops.rank1.cuda_pool_linear_bwd, backward_args)
    curs = [torch.randn(6, 4, device=device).requires_grad_(), torch.randn(3, 5, device=device).requires_grad_()]
    prevs = [torch.randn(6, 3, device=device), torch.randn(3, 2, device=device)]
    masks = [
        torch.tensor([1, 0, 1, 1], dtype=torch.bool, device=device),
        torch.ones(5, dtype=torch.bool, device=device),
    ]
    prev_masks = [torch.ones(3, dtype=torch.bool, device=device), torch.tensor([0, 1], dtype=torch.bool, device=device)]
    for p in (1, 2):
        torch.library.opcheck(torch.ops.rank1.cuda_ago_fwd, (curs, prevs, masks, prev_masks, p))
        losses, gram = torch.ops.rank1.cuda_ago_fwd(curs, prevs, masks, prev_masks, p)
        detached = [c.detach() for c in curs]  # the backward op is not itself differentiable
        for prev_requires_grad in (False, True):
            args = (torch.ones_like(losses).detach(), gram.detach(), detached, prevs, masks, prev_masks, p,
                    prev_requires_grad)  # fmt: skip
            torch.library.opcheck(torch.ops.rank1.cuda_ago_bwd, args)


def check_compiled_layer(device):
    """A FusedRank1PoolLinear on backend='cuda' under torch.compile(fullgraph=True), forward and backward."""
    layer = rank1_kernels.FusedRank1PoolLinear(32, 48, r=12, k=4, backend="cuda", gate="softmax").to(device)
    torch.nn.init.normal_(layer.lora_B)  # B starts at zero: make the pool's contribution visible
    compiled = torch.compile(layer, fullgraph=True)
    inputs = torch.randn(2, 9, 32, device=device)
    got = compiled(inputs)
    got_grad = torch.autograd.grad(got.square().sum(), layer.lora_A)[0]
    reference_layer = copy.deepcopy(layer)
    reference_layer.backend = "reference"
    same = reference_layer(inputs)
    same_grad = torch.autograd.grad(same.square().sum(), reference_layer.lora_A)[0]
    oracle_layer = reference_layer.double()
    oracle = oracle_layer(inputs.double())
    oracle_grad = torch.autograd.grad(oracle.square().sum(), oracle_layer.lora_A)[0]
    assert_close_by_rule(got, same, oracle, "compiled cuda layer")
    assert_close_by_rule(got_grad, same_grad, oracle_grad, "compiled cuda layer, dA")
