"""The "cuda" backend. Without a GPU only its Python side runs here: refusals, the build decision, and the
autograd/fake registrations driven through a CPU stand-in of the kernels. The kernels themselves are checked
against the reference by the GPU-marked tests (skipped without CUDA)."""

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rank1_kernels
from rank1_kernels import cuda_backend
from rank1_kernels.cuda_build import gencode_flags, parallel_jobs
from _tolerance import assert_close_by_rule

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
    assert setup.extension_decision({"RANK1_BUILD_CUDA": "1", "RANK1_SKIP_CUDA": "1"}, torch_importable=True)[0] is False
    with pytest.raises(RuntimeError, match="--no-build-isolation"):
        setup.extension_decision({"RANK1_BUILD_CUDA": "1"}, torch_importable=False)


def test_arch_flags_and_jobs(monkeypatch):
    assert gencode_flags("8.0;9.0") == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    assert gencode_flags("9.0+PTX") == ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert gencode_flags() == ["-gencode=arch=compute_86,code=sm_86"]
    assert 1 <= parallel_jobs() <= (__import__("os").cpu_count() or 1)


# The CPU stand-in: the kernels' algorithm (shrink onto the chosen experts, gated expand, per-(sample, slot)
# partials scattered to experts, per-sample gate sums) written with torch ops, registered under the same schemas.
# It runs in a subprocess, so that the ops it defines do not leak into this process's rank1 namespace.
STAND_IN = textwrap.dedent(
    """
    import torch
    from rank1_kernels import cuda_backend, rank1_pool_linear_ref, ago_loss_grouped_ref

    library = torch.library.Library("rank1", "FRAGMENT")
    for schema in cuda_backend.SCHEMAS.values():
        library.define(schema)

    def shrink(src, proj_rows, idx, T):  # (rows, k) fp32: src[row] . proj_rows[expert]
        n = idx.shape[0]
        return torch.einsum("ntd,nkd->ntk", src.float().reshape(n, T, -1), proj_rows.float()[idx]).reshape(-1, idx.shape[1])

    def expand(coef, rows_of, idx, T):  # (rows, out): sum_slot coef * rows_of[expert]
        n = idx.shape[0]
        return torch.einsum("ntk,nko->nto", coef.reshape(n, T, -1), rows_of.float()[idx]).reshape(n * T, -1)

    def expert_grad(coef, gates, scaling, m, idx, T, n_experts):
        n, k = idx.shape
        partial = torch.einsum("ntk,ntc->nkc", coef.reshape(n, T, k), m.float().reshape(n, T, -1))
        partial = partial * (gates.float() * scaling).unsqueeze(-1)
        out = torch.zeros(n_experts, m.shape[1])
        return out.index_add_(0, idx.reshape(-1), partial.reshape(n * k, -1))

    def fwd(x, weight, bias, A, B, idx, gates, scaling, T, lora_input):
        src = x if lora_input is None else lora_input
        u = shrink(src, A, idx, T)
        coef = u * (gates.float() * scaling).repeat_interleave(T, 0)
        y = torch.nn.functional.linear(x, weight, bias).float() + expand(coef, B.t(), idx, T)
        return y.to(x.dtype), u

    def bwd(dy, x, weight, A, B, idx, gates, u, scaling, T, lora_input):
        src = x if lora_input is None else lora_input
        v = shrink(dy, B.t(), idx, T)
        lora_dx = expand(v * (gates.float() * scaling).repeat_interleave(T, 0), A, idx, T)
        dx = (dy.float() @ weight.float()) + (0 if lora_input is not None else lora_dx)
        d_lora = lora_dx.to(x.dtype) if lora_input is not None else x.new_empty(0)
        dA = expert_grad(v, gates, scaling, src, idx, T, A.shape[0]).to(A.dtype)
        dB = expert_grad(u, gates, scaling, dy, idx, T, A.shape[0]).t().contiguous().to(B.dtype)
        dgates = ((u * v).reshape(idx.shape[0], T, -1).sum(1) * scaling).to(gates.dtype)
        return dx.to(x.dtype), d_lora, dA, dB, dgates

    def ago_fwd(B_curs, B_prevs, cur_masks, prev_masks, p):
        grams = [((c * m.to(c.dtype)).t() @ (q * pm.to(q.dtype))).float().reshape(-1)
                 for c, q, m, pm in zip(B_curs, B_prevs, cur_masks, prev_masks)]
        losses = torch.stack([g.abs().sum() if p == 1 else g.square().sum() for g in grams])
        return losses, torch.cat(grams)

    def ago_bwd(grad, gram, B_curs, B_prevs, cur_masks, prev_masks, p, prev_requires_grad):
        d_curs, d_prevs, start = [], [], 0
        for layer, (c, q, m, pm) in enumerate(zip(B_curs, B_prevs, cur_masks, prev_masks)):
            g = gram[start:start + c.shape[1] * q.shape[1]].reshape(c.shape[1], q.shape[1])
            start += g.numel()
            slope = (g.sign() if p == 1 else 2 * g) * grad[layer]
            qm, cm = q.float() * pm, c.float() * m
            d_curs.append(((qm @ slope.t()) * m).to(c.dtype))
            if prev_requires_grad:
                d_prevs.append(((cm @ slope) * pm).to(q.dtype))
        return d_curs, d_prevs

    for name, fn in [("cuda_pool_linear_fwd", fwd), ("cuda_pool_linear_bwd", bwd),
                     ("cuda_ago_fwd", ago_fwd), ("cuda_ago_bwd", ago_bwd)]:
        library.impl(name, fn, "CPU")
    assert cuda_backend.extension_missing_reason() is None  # the ops exist: fakes and autograd get registered

    import sys
    sys.path.insert(0, "tests")
    from _tolerance import assert_close_by_rule

    def grads_of(fn, leaves, cast):
        inputs = [cast(t).requires_grad_() for t in leaves]
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        return [out, *torch.autograd.grad((out * weights).sum(), inputs)]

    def compare(fn_ops, fn_ref, leaves, what):
        got = grads_of(fn_ops, leaves, lambda t: t.detach().clone())
        same = grads_of(fn_ref, leaves, lambda t: t.detach().clone())
        oracle = grads_of(fn_ref, leaves, lambda t: t.detach().double())
        for i, (a, s_, o) in enumerate(zip(got, same, oracle)):
            assert_close_by_rule(a, s_, o, f"{what} output {i}")

    g = torch.Generator().manual_seed(0)
    n, T, d_in, d_out, r, k = 3, 5, 7, 6, 5, 2
    weight, bias = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    idx = torch.stack([torch.randperm(r, generator=g)[:k] for _ in range(n)])
    for with_lora_input in (False, True):
        leaves = [torch.randn(n * T, d_in, generator=g), torch.randn(r, d_in, generator=g),
                  torch.randn(d_out, r, generator=g), torch.rand(n, k, generator=g) + 0.5]
        if with_lora_input:
            leaves.append(torch.randn(n * T, d_in, generator=g))

        def call(op):
            def run(x, A, B, gates, *rest):
                return op(x, weight.to(x.dtype), bias.to(x.dtype), A, B, idx, gates, 0.5, T, rest[0] if rest else None)
            return run

        opcheck_args = tuple([t.clone().requires_grad_() for t in leaves[:1]] + [weight, bias]
                             + [t.clone().requires_grad_() for t in leaves[1:3]] + [idx, leaves[3].clone().requires_grad_(),
                             0.5, T, leaves[4].clone().requires_grad_() if with_lora_input else None])
        torch.library.opcheck(torch.ops.rank1.cuda_pool_linear_fwd, opcheck_args)
        compare(call(torch.ops.rank1.cuda_pool_linear_fwd), call(rank1_pool_linear_ref), leaves, f"pool (lora_input={with_lora_input})")

    curs = [torch.randn(6, 4), torch.randn(3, 5)]
    prevs = [torch.randn(6, 3), torch.randn(3, 2)]
    masks = [torch.tensor([1, 0, 1, 1], dtype=torch.bool), torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool)]
    prev_masks = [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    for p in (1, 2):
        torch.library.opcheck(torch.ops.rank1.cuda_ago_fwd, ([c.clone().requires_grad_() for c in curs], prevs, masks, prev_masks, p))

        def ops_fn(c0, c1, q0, q1):
            return torch.ops.rank1.cuda_ago_fwd([c0, c1], [q0, q1], masks, prev_masks, p)[0].to(c0.dtype)

        def ref_fn(c0, c1, q0, q1):
            return ago_loss_grouped_ref([c0, c1], [q0, q1], masks, prev_masks, p)

        compare(ops_fn, ref_fn, curs + prevs, f"AGO p={p}")
    print("stand-in checks passed")
    """
)


def test_registrations_and_autograd_through_a_cpu_stand_in():
    """Schemas, fake implementations (opcheck) and the autograd formulas of the CUDA ops, with the kernels replaced
    by a torch transcription of their algorithm: catches a wrong gradient routing in the Python glue."""
    result = subprocess.run([sys.executable, "-c", STAND_IN], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0 and "stand-in checks passed" in result.stdout, result.stderr[-4000:]


# ---- on a GPU: the kernels against the reference -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_ops():
    if cuda_backend.extension_missing_reason() is not None:
        from rank1_kernels import cuda_jit

        cuda_jit.load()
    return cuda_backend


def _pool_case(n, T, d_in, d_out, r, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n * T, d_in, device="cuda", generator=g)
    weight = torch.randn(d_out, d_in, device="cuda", generator=g) / d_in**0.5
    bias = torch.randn(d_out, device="cuda", generator=g)
    A = torch.randn(r, d_in, device="cuda", generator=g) / d_in**0.5
    B = torch.randn(d_out, r, device="cuda", generator=g)
    scores = torch.rand(n, r, device="cuda", generator=g)
    idx = scores.argsort(dim=1)[:, :k].contiguous()
    gates = torch.rand(n, k, device="cuda", generator=g) + 0.5
    return [t.to(dtype) if t.is_floating_point() else t for t in (x, weight, bias, A, B, idx, gates)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "n,T,d_in,d_out,r,k",
    [(1, 1, 1, 1, 1, 1), (3, 5, 17, 37, 7, 3), (2, 197, 768, 768, 12, 8), (4, 197, 768, 3072, 64, 4),
     (2, 50, 3072, 768, 256, 8), (5, 3, 33, 65, 12, 12)],
)  # fmt: skip
@pytest.mark.parametrize("with_lora_input", [False, True])
def test_pool_linear_matches_the_reference(cuda_ops, dtype, n, T, d_in, d_out, r, k, with_lora_input):
    x, weight, bias, A, B, idx, gates = _pool_case(n, T, d_in, d_out, r, k, dtype)
    lora_input = torch.randn_like(x) if with_lora_input else None
    leaves = [x, A, B, gates] + ([lora_input] if with_lora_input else [])

    def run(backend, cast):
        inputs = [cast(t).requires_grad_() for t in leaves]
        xs, As, Bs, gs, *rest = inputs
        y = rank1_kernels.rank1_pool_linear(
            xs, cast(weight), cast(bias), As, Bs, idx, gs, 0.25, T, rest[0] if rest else None, backend=backend
        )
        dy = torch.ones_like(y) * torch.linspace(-1, 1, y.shape[-1], device="cuda", dtype=y.dtype)
        return [y, *torch.autograd.grad(y, inputs, dy)]

    oracle = run("reference", lambda t: t.detach().double())
    same = run("reference", lambda t: t.detach().clone())
    got = run("cuda", lambda t: t.detach().clone())
    for name, a, s, o in zip(("y", "dx", "dA", "dB", "dgates", "d_lora_input"), got, same, oracle):
        assert_close_by_rule(a, s, o, f"cuda {name} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [1, 2])
def test_ago_matches_the_reference(cuda_ops, dtype, p):
    g = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(768, 12, 8), (3072, 12, 0), (512, 12, 44), (1, 1, 1)]
    curs = [torch.randn(d, r, device="cuda", generator=g) for d, r, _ in shapes]
    prevs = [torch.randn(d, m, device="cuda", generator=g) for d, _, m in shapes]
    masks = [torch.rand(r, device="cuda", generator=g) > 0.5 for _, r, _ in shapes]
    prev_masks = [torch.ones(m, dtype=torch.bool, device="cuda") for _, _, m in shapes]

    def run(backend, cast):
        leaves = [cast(t).requires_grad_() for t in curs]
        losses = rank1_kernels.ago_loss_grouped(leaves, [cast(t) for t in prevs], masks, prev_masks, p, backend=backend)
        return [losses, *torch.autograd.grad(losses.sum(), leaves)]

    oracle = run("reference", lambda t: t.detach().double())
    same = run("reference", lambda t: t.detach().to(dtype))
    got = run("cuda", lambda t: t.detach().to(dtype))
    for name, a, s, o in zip(["losses"] + [f"d_cur[{i}]" for i in range(4)], got, same, oracle):
        assert_close_by_rule(a, s, o, f"cuda AGO {name} {dtype} p={p}")


@pytest.mark.gpu
def test_opcheck_and_compile_on_gpu(cuda_ops):
    x, weight, bias, A, B, idx, gates = _pool_case(2, 9, 32, 48, 12, 4, torch.float32)
    args = (x.requires_grad_(), weight, bias, A.requires_grad_(), B.requires_grad_(), idx, gates.requires_grad_(), 0.5, 9, None)
    torch.library.opcheck(torch.ops.rank1.cuda_pool_linear_fwd, args)
    layer = rank1_kernels.FusedRank1PoolLinear(32, 48, r=12, k=4, backend="cuda", gate="softmax").cuda()
    compiled = torch.compile(layer, fullgraph=True)
    inputs = torch.randn(2, 9, 32, device="cuda")
    got = compiled(inputs)
    reference_layer = copy.deepcopy(layer)
    reference_layer.backend = "reference"
    same = reference_layer(inputs)
    oracle = reference_layer.double()(inputs.double())
    assert_close_by_rule(got, same, oracle, "compiled cuda layer")
