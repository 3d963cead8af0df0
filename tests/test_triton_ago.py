"""The grouped Triton AGO Gram against the reference: per-layer losses and gradients to B_cur and B_prev.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import pytest
import torch

pytest.importorskip("triton")

from _tolerance import assert_close_by_rule

from rank1_kernels import ago_loss_grouped, ago_loss_grouped_ref
from rank1_kernels import triton_ago
from rank1_kernels.triton_ago import triton_ago_grouped

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (d_out, r_cur, r_prev) per layer: odd and prime sizes, size 1, a layer with no history, more columns than a tile.
CPU_LAYERS = [(17, 5, 3), (1, 1, 1), (37, 7, 0), (3, 12, 40), (23, 13, 8)]
# Layers sharing r and m, as a model's pools do: packed by stacking rows (one cat), not one flatten per layer.
SHARED_COLUMN_LAYERS = [(17, 5, 3), (1, 5, 3), (37, 5, 3), (4, 5, 3)]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _layers(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B_curs = [torch.randn(d, r, generator=g, dtype=torch.float64).to(device) for d, r, _ in shapes]
    B_prevs = [torch.randn(d, m, generator=g, dtype=torch.float64).to(device) for d, _, m in shapes]
    # Masks keep at least one column where there is one, and drop some elsewhere.
    cur_masks = [(torch.arange(r) % 3 != 1).to(device) for _, r, _ in shapes]
    prev_masks = [(torch.rand(m, generator=g) > 0.3).index_fill(0, torch.arange(min(m, 1)), True).to(device)
                  for _, _, m in shapes]  # fmt: skip
    return B_curs, B_prevs, cur_masks, prev_masks


def _losses_and_grads(fn, B_curs, B_prevs, cur_masks, prev_masks, p, dtype, weights):
    curs = [b.to(dtype).requires_grad_() for b in B_curs]
    prevs = [b.to(dtype).requires_grad_() for b in B_prevs]
    losses = fn(curs, prevs, cur_masks, prev_masks, p)
    grads = torch.autograd.grad((losses * weights.to(losses.dtype)).sum(), curs + prevs)
    return losses, grads


@pytest.mark.parametrize("shapes", [CPU_LAYERS, SHARED_COLUMN_LAYERS], ids=["mixed", "shared-columns"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_losses_and_gradients_match_reference(dtype, p, shapes, seed=0):
    B_curs, B_prevs, cur_masks, prev_masks = _layers(shapes, _device(), seed)
    rounded = ([b.to(dtype).double() for b in B_curs], [b.to(dtype).double() for b in B_prevs])
    # Distinct upstream weights per layer check that each layer's gradient uses its own loss's gradient.
    weights = torch.linspace(0.5, 1.5, len(shapes), dtype=torch.float64, device=_device())
    args = (cur_masks, prev_masks, p)
    losses, grads = _losses_and_grads(triton_ago_grouped, B_curs, B_prevs, *args, dtype, weights)
    losses_ref, grads_ref = _losses_and_grads(ago_loss_grouped_ref, B_curs, B_prevs, *args, dtype, weights)
    losses_oracle, grads_oracle = _losses_and_grads(ago_loss_grouped_ref, *rounded, *args, torch.float64, weights)
    assert losses.dtype == dtype and losses.shape == (len(shapes),)
    assert_close_by_rule(losses, losses_ref, losses_oracle, f"{dtype} p={p}: losses")
    for layer, (grad, grad_ref, grad_oracle) in enumerate(zip(grads, grads_ref, grads_oracle)):
        side = "B_cur" if layer < len(shapes) else "B_prev"
        assert_close_by_rule(grad, grad_ref, grad_oracle, f"{dtype} p={p}: d{side} of layer {layer % len(shapes)}")


def test_layer_without_history_is_zero_and_gradients_only_reach_masked_columns():
    B_curs, B_prevs, cur_masks, prev_masks = _layers(CPU_LAYERS, _device(), seed=1)
    curs = [b.float().requires_grad_() for b in B_curs]
    prevs = [b.float().requires_grad_() for b in B_prevs]
    losses = triton_ago_grouped(curs, prevs, cur_masks, prev_masks, 1)
    assert float(losses[2].detach()) == 0.0 and bool((losses.detach()[[0, 1, 3, 4]] > 0).all())
    grads = torch.autograd.grad(losses.sum(), curs + prevs)
    for grad, mask in zip(grads, cur_masks + prev_masks):
        assert torch.count_nonzero(grad[:, ~mask]) == 0


@pytest.mark.parametrize("shape", [(8, 0), (0, 4)], ids=["no-experts", "no-rows"])
def test_all_layers_empty_still_give_a_differentiable_zero(shape):
    """With nothing to pack the kernels get one padded zero; the losses must still be part of the graph, or a
    training step's backward() fails with "does not require grad"."""
    curs = [torch.randn(*shape, device=_device(), requires_grad=True)]
    prevs = [torch.randn(shape[0], 3, device=_device())]
    cur_masks = [torch.ones(shape[1], dtype=torch.bool, device=_device())]
    losses = triton_ago_grouped(curs, prevs, cur_masks, [torch.ones(3, dtype=torch.bool, device=_device())], 1)
    assert losses.tolist() == [0.0] and losses.requires_grad
    (grad,) = torch.autograd.grad(losses.sum(), curs)
    assert grad.shape == shape


def test_layer_table_is_reused_across_steps():
    """A training step after the first copies nothing from the host (CUDA-graph capturable)."""
    B_curs, B_prevs, cur_masks, prev_masks = _layers(CPU_LAYERS, _device(), seed=7)
    curs, prevs = [b.float() for b in B_curs], [b.float() for b in B_prevs]
    triton_ago_grouped(curs, prevs, cur_masks, prev_masks, 1)
    tables_before = dict(triton_ago._TABLE_CACHE)
    triton_ago_grouped([c * 2 for c in curs], prevs, cur_masks, prev_masks, 1)
    assert tables_before and triton_ago._TABLE_CACHE.keys() == tables_before.keys()
    assert all(triton_ago._TABLE_CACHE[key] is table for key, table in tables_before.items())


def test_a_table_first_made_under_inference_mode_serves_training():
    """An evaluation that logs the AGO penalty under inference_mode may be the first call for some layer shapes; the
    cached table must still be a tensor that a training step can save for backward."""
    shapes = [(11, 3, 2), (5, 3, 2)]  # shapes no other test uses: this call makes the table
    B_curs, B_prevs, cur_masks, prev_masks = _layers(shapes, _device(), seed=9)
    curs, prevs = [b.float() for b in B_curs], [b.float() for b in B_prevs]
    with torch.inference_mode():
        triton_ago_grouped(curs, prevs, cur_masks, prev_masks, 1)
    leaves = [c.clone().requires_grad_() for c in curs]
    losses = triton_ago_grouped(leaves, prevs, cur_masks, prev_masks, 1)
    grads = torch.autograd.grad(losses.sum(), leaves)
    same = torch.autograd.grad(ago_loss_grouped_ref(leaves, prevs, cur_masks, prev_masks, 1).sum(), leaves)
    exact = [b.clone().requires_grad_() for b in B_curs]
    oracle = torch.autograd.grad(ago_loss_grouped_ref(exact, B_prevs, cur_masks, prev_masks, 1).sum(), exact)
    for index, (got, reference, truth) in enumerate(zip(grads, same, oracle)):
        assert_close_by_rule(got, reference, truth, f"d_cur[{index}] after an inference_mode first call")


def test_deterministic_bits():
    B_curs, B_prevs, cur_masks, prev_masks = _layers(CPU_LAYERS, _device(), seed=2)

    def once():
        curs = [b.float().requires_grad_() for b in B_curs]
        losses = triton_ago_grouped(curs, [b.float() for b in B_prevs], cur_masks, prev_masks, 1)
        return [losses, *torch.autograd.grad(losses.sum(), curs)]

    for first, second in zip(once(), once()):
        assert torch.equal(first, second)


def test_through_dispatch_and_refusals():
    B_curs, B_prevs, cur_masks, prev_masks = _layers(CPU_LAYERS[:2], _device(), seed=3)
    curs, prevs = [b.float() for b in B_curs], [b.float() for b in B_prevs]
    torch.testing.assert_close(
        ago_loss_grouped(curs, prevs, cur_masks, prev_masks, p=2, backend="triton"),
        ago_loss_grouped_ref(curs, prevs, cur_masks, prev_masks, p=2), rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"float64 is not supported.*backend='reference'"):
        ago_loss_grouped(B_curs, B_prevs, cur_masks, prev_masks, backend="triton")
    mixed = [curs[0], curs[1].half()]
    with pytest.raises(RuntimeError, match="one dtype and on one device"):
        ago_loss_grouped(mixed, [prevs[0], prevs[1].half()], cur_masks, prev_masks, backend="triton")
    assert ago_loss_grouped([], [], [], [], backend="triton").shape == (0,)


def test_opcheck():
    B_curs, B_prevs, cur_masks, prev_masks = _layers([(5, 3, 2), (4, 2, 3)], _device(), seed=4)
    cur_flat = torch.cat([b.float().reshape(-1) for b in B_curs]).requires_grad_()
    prev_flat = torch.cat([b.float().reshape(-1) for b in B_prevs]).requires_grad_()
    cur_mask_flat = torch.cat([m.float() for m in cur_masks])
    prev_mask_flat = torch.cat([m.float() for m in prev_masks])
    table = torch.tensor([[0, 0, 5, 3, 2, 0, 0, 0], [15, 10, 4, 2, 3, 3, 2, 6]], device=cur_flat.device)
    forward_args = (cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, 1, 12, 3, 5)
    torch.library.opcheck(torch.ops.rank1.triton_ago_gram_fwd.default, forward_args)
    with torch.no_grad():
        _, dphi = torch.ops.rank1.triton_ago_gram_fwd(*forward_args)
    backward_args = (torch.ones(2, device=cur_flat.device), cur_flat.detach(), prev_flat.detach(), cur_mask_flat,
                     prev_mask_flat, table, dphi, 3, 5, True, True)  # fmt: skip
    torch.library.opcheck(torch.ops.rank1.triton_ago_gram_bwd.default, backward_args)


def test_eager_function_and_registered_op_compute_the_same_bits(monkeypatch):
    """Eager mode runs the ops' bodies through `_EagerAgoGram` (no dispatcher); torch.compile traces the registered
    ops. Both must give the same losses and gradients, bit for bit."""
    B_curs, B_prevs, cur_masks, prev_masks = _layers(CPU_LAYERS, _device(), seed=8)

    def losses_and_grads():
        curs = [b.float().requires_grad_() for b in B_curs]
        prevs = [b.float().requires_grad_() for b in B_prevs]
        losses = ago_loss_grouped(curs, prevs, cur_masks, prev_masks, p=1, backend="triton")
        weights = torch.arange(1.0, len(curs) + 1, device=losses.device)  # a different upstream gradient per layer
        return losses, torch.autograd.grad((losses * weights).sum(), [*curs, *prevs])

    eager_losses, eager_grads = losses_and_grads()
    assert type(eager_losses.grad_fn).__name__ == "_EagerAgoGramBackward"

    class ThroughRegisteredOp:
        @staticmethod
        def apply(*inputs):
            return torch.ops.rank1.triton_ago_gram_fwd(*inputs)[0]

    monkeypatch.setattr(triton_ago, "_EagerAgoGram", ThroughRegisteredOp)
    op_losses, op_grads = losses_and_grads()
    assert type(op_losses.grad_fn).__name__ != "_EagerAgoGramBackward"
    assert torch.equal(eager_losses, op_losses)
    for eager_grad, op_grad in zip(eager_grads, op_grads):
        assert torch.equal(eager_grad, op_grad)


def _compile_matches_eager(device):
    B_curs, B_prevs, cur_masks, prev_masks = _layers(CPU_LAYERS, device, seed=5)
    curs = [b.float().requires_grad_() for b in B_curs]
    prevs = [b.float() for b in B_prevs]

    def penalty(curs):
        # The per-layer losses: a mean taken inside the graph may be lowered as sum / n where eager CUDA multiplies
        # by 1 / n, one rounding apart, which says nothing about the op.
        return ago_loss_grouped(curs, prevs, cur_masks, prev_masks, p=1, backend="triton")

    compiled = torch.compile(penalty, fullgraph=True)
    losses = compiled(curs)
    losses_eager = penalty(curs)
    torch.testing.assert_close(losses, losses_eager, rtol=0, atol=0)
    weights = torch.linspace(0.5, 1.5, len(curs), device=device)  # a different gradient for each layer's loss
    grads = torch.autograd.grad(losses, curs, weights)
    for grad, grad_eager in zip(grads, torch.autograd.grad(losses_eager, curs, weights)):
        torch.testing.assert_close(grad, grad_eager, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU variant below runs instead")
def test_torch_compile_fullgraph_on_cpu_interpreter():
    _compile_matches_eager(torch.device("cpu"))


# ---- GPU: the 144 pool layers of CLIP ViT-B/16 ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_vit_b16_layers_on_gpu(dtype, p):
    # Per block: q, k, v, out (768 -> 768), fc1 (768 -> 3072), fc2 (3072 -> 768) in the vision tower, the text
    # tower's (512 / 2048) alike; r = 12 with 4 merged columns from each of 10 earlier tasks.
    per_block = [(768, 12, 40)] * 5 + [(3072, 12, 40)] + [(512, 12, 40)] * 5 + [(2048, 12, 40)]
    test_losses_and_gradients_match_reference(dtype, p, shapes=per_block * 12, seed=6)


@pytest.mark.gpu
def test_torch_compile_fullgraph_on_gpu():
    _compile_matches_eager(torch.device("cuda"))


@pytest.mark.gpu
def test_forward_captures_in_a_cuda_graph_after_a_warm_up_step():
    B_curs, B_prevs, cur_masks, prev_masks = _layers(CPU_LAYERS, torch.device("cuda"), seed=8)
    curs, prevs = [b.float() for b in B_curs], [b.float() for b in B_prevs]
    expected = triton_ago_grouped(curs, prevs, cur_masks, prev_masks, 1)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_ago_grouped(curs, prevs, cur_masks, prev_masks, 1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)
