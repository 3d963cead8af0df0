"""The grouped AGO Gram in Triton: every pool layer of a model in one launch, forward and backward.

Per layer l (reference: `rank1_kernels.ago.ago_loss_ref`):

    G_l    = (B_cur * cur_mask)^T (B_prev * prev_mask)            (r_l, m_l)
    loss_l = sum |G_l|^p                                          p = 1 or 2
    dloss_l/dB_cur  = (B_prev * prev_mask) dphi(G_l)^T * cur_mask    dphi = sign (p = 1) or 2 G (p = 2)
    dloss_l/dB_prev = (B_cur * cur_mask) dphi(G_l) * prev_mask

The layers (any d_out, r and m each) are packed into flat buffers with an int64 table of offsets and sizes, so one
program per layer computes its Gram, loss and dphi; the backward runs one program per (layer, row block). Every sum
runs in a fixed order inside one program: no atomics, the same bits every run. Accumulation is fp32.
"""

from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from ._eager import call, eager_function
from ._launch import block as _block
from ._launch import cdiv as _cdiv
from .triton_pool_linear import _to

# Columns of the per-layer table.
_CUR_OFFSET, _PREV_OFFSET, _ROWS, _CUR_COLS, _PREV_COLS, _CUR_MASK_OFFSET, _PREV_MASK_OFFSET, _GRAM_OFFSET = range(8)
_TABLE_WIDTH = 8


@triton.jit
def _ago_gram_kernel(
    cur_ptr, prev_ptr, cur_mask_ptr, prev_mask_ptr, table_ptr, loss_ptr, dphi_ptr,
    P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    layer = tl.program_id(0).to(tl.int64)
    entry = table_ptr + layer * 8
    cur_offset, prev_offset = tl.load(entry + 0), tl.load(entry + 1)
    rows, cur_cols, prev_cols = tl.load(entry + 2), tl.load(entry + 3), tl.load(entry + 4)
    cur_mask_offset, prev_mask_offset, gram_offset = tl.load(entry + 5), tl.load(entry + 6), tl.load(entry + 7)
    total = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for r0 in range(0, cur_cols, BLOCK_R):
        cs = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        c_ok = cs < cur_cols
        cur_mask = tl.load(cur_mask_ptr + cur_mask_offset + cs, mask=c_ok, other=0.0)
        for m0 in range(0, prev_cols, BLOCK_M):
            js = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            j_ok = js < prev_cols
            prev_mask = tl.load(prev_mask_ptr + prev_mask_offset + js, mask=j_ok, other=0.0)
            gram = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
            for d0 in range(0, rows, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                d_ok = ds < rows
                cur_t = tl.load(cur_ptr + cur_offset + ds[None, :] * cur_cols + cs[:, None],
                                mask=c_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
                prev = tl.load(prev_ptr + prev_offset + ds[:, None] * prev_cols + js[None, :],
                               mask=d_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
                gram = tl.dot(cur_t, prev, gram, input_precision="ieee")
            gram = gram * cur_mask[:, None] * prev_mask[None, :]
            if P == 1:
                total += tl.abs(gram)
                dphi = tl.where(gram > 0, 1.0, tl.where(gram < 0, -1.0, 0.0))
            else:
                total += gram * gram
                dphi = 2.0 * gram
            tl.store(dphi_ptr + gram_offset + cs[:, None] * prev_cols + js[None, :], dphi,
                     mask=c_ok[:, None] & j_ok[None, :])  # fmt: skip
    tl.store(loss_ptr + layer, tl.sum(tl.sum(total, axis=1), axis=0))


@triton.jit
def _ago_grad_kernel(
    grad_loss_ptr, own_ptr, other_ptr, own_mask_ptr, other_mask_ptr, table_ptr, dphi_ptr, out_ptr,
    OWN_IS_CUR: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """out[d, a] = grad_loss * own_mask[a] * sum_b other[d, b] other_mask[b] dphi(a, b) for one row block of a layer;
    "own" is the side receiving the gradient (B_cur: dphi(a, b) = dphi[a, b]; B_prev: dphi(a, b) = dphi[b, a])."""
    layer = tl.program_id(0).to(tl.int64)
    entry = table_ptr + layer * 8
    rows = tl.load(entry + 2)
    cur_cols, prev_cols = tl.load(entry + 3), tl.load(entry + 4)
    gram_offset = tl.load(entry + 7)
    if OWN_IS_CUR:
        own_offset, other_offset = tl.load(entry + 0), tl.load(entry + 1)
        own_mask_offset, other_mask_offset = tl.load(entry + 5), tl.load(entry + 6)
        own_cols, other_cols = cur_cols, prev_cols
    else:
        own_offset, other_offset = tl.load(entry + 1), tl.load(entry + 0)
        own_mask_offset, other_mask_offset = tl.load(entry + 6), tl.load(entry + 5)
        own_cols, other_cols = prev_cols, cur_cols
    grad_loss = tl.load(grad_loss_ptr + layer).to(tl.float32)
    ds = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < rows
    for a0 in range(0, own_cols, BLOCK_A):
        a_idx = a0 + tl.arange(0, BLOCK_A).to(tl.int64)
        a_ok = a_idx < own_cols
        acc = tl.zeros((BLOCK_D, BLOCK_A), dtype=tl.float32)
        for b0 in range(0, other_cols, BLOCK_B):
            b_idx = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
            b_ok = b_idx < other_cols
            other_mask = tl.load(other_mask_ptr + other_mask_offset + b_idx, mask=b_ok, other=0.0)
            other = tl.load(other_ptr + other_offset + ds[:, None] * other_cols + b_idx[None, :],
                            mask=d_ok[:, None] & b_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
            if OWN_IS_CUR:  # dphi is (cur_cols, prev_cols) = (own, other); load its transpose (b, a)
                dphi_t = tl.load(dphi_ptr + gram_offset + a_idx[None, :] * prev_cols + b_idx[:, None],
                                 mask=b_ok[:, None] & a_ok[None, :], other=0.0)  # fmt: skip
            else:  # dphi is (other, own): (b, a) as stored
                dphi_t = tl.load(dphi_ptr + gram_offset + b_idx[:, None] * prev_cols + a_idx[None, :],
                                 mask=b_ok[:, None] & a_ok[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(other * other_mask[None, :], dphi_t, acc, input_precision="ieee")
        own_mask = tl.load(own_mask_ptr + own_mask_offset + a_idx, mask=a_ok, other=0.0)
        acc = acc * own_mask[None, :] * grad_loss
        tl.store(out_ptr + own_offset + ds[:, None] * own_cols + a_idx[None, :], _to(acc, out_ptr.dtype.element_ty),
                 mask=d_ok[:, None] & a_ok[None, :])  # fmt: skip


# Each op's body is a plain function: the registered op (what torch.compile traces) and the eager autograd.Function
# (`_EagerAgoGram`, which skips the dispatcher's overhead: rank1_kernels/_eager.py) both call it.


def _forward(cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, p, gram_numel, max_cols, max_rows):
    """Packed layers -> (per-layer losses (n_layers,) fp32, dphi of every Gram (gram_numel,) fp32 for backward)."""
    n_layers = table.shape[0]
    losses = torch.empty(n_layers, device=cur_flat.device, dtype=torch.float32)
    dphi = torch.empty(max(gram_numel, 1), device=cur_flat.device, dtype=torch.float32)
    if n_layers:
        _ago_gram_kernel[(n_layers,)](
            cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, losses, dphi,
            P=p, BLOCK_R=_block(max_cols, 32), BLOCK_M=_block(max_cols, 32), BLOCK_D=_block(max_rows, 64),
        )  # fmt: skip
    return losses, dphi


@torch.library.custom_op("rank1::triton_ago_gram_fwd", mutates_args=())
def triton_ago_gram_fwd(
    cur_flat: torch.Tensor, prev_flat: torch.Tensor, cur_mask_flat: torch.Tensor, prev_mask_flat: torch.Tensor,
    table: torch.Tensor, p: int, gram_numel: int, max_cols: int, max_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Packed layers -> (per-layer losses (n_layers,) fp32, dphi of every Gram (gram_numel,) fp32 for backward).
    table: (n_layers, 8) int64; max_cols / max_rows bound the r, m and d_out of all layers (tile sizes only)."""
    return _forward(cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, p, gram_numel, max_cols, max_rows)


@triton_ago_gram_fwd.register_fake
def _(cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, p, gram_numel, max_cols, max_rows):
    return (cur_flat.new_empty(table.shape[0], dtype=torch.float32),
            cur_flat.new_empty(max(gram_numel, 1), dtype=torch.float32))  # fmt: skip


def _backward_kernels(grad_losses, cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, dphi, max_cols,
                      max_rows, need_cur, need_prev):  # fmt: skip
    """Gradients of the packed B_cur and B_prev buffers (empty where not asked for)."""
    n_layers = table.shape[0]
    grads = []
    for need, own, other, own_mask, other_mask, own_is_cur in (
        (need_cur, cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, True),
        (need_prev, prev_flat, cur_flat, prev_mask_flat, cur_mask_flat, False),
    ):
        if not need:
            grads.append(own.new_empty(0))
            continue
        out = torch.zeros_like(own)
        if n_layers and own.numel():
            block_d = _block(max_rows, 64)
            _ago_grad_kernel[(n_layers, _cdiv(max_rows, block_d))](
                grad_losses, own, other, own_mask, other_mask, table, dphi, out,
                OWN_IS_CUR=own_is_cur, BLOCK_D=block_d, BLOCK_A=_block(max_cols, 32), BLOCK_B=_block(max_cols, 32),
            )  # fmt: skip
        grads.append(out)
    return grads[0], grads[1]


@torch.library.custom_op("rank1::triton_ago_gram_bwd", mutates_args=())
def triton_ago_gram_bwd(
    grad_losses: torch.Tensor, cur_flat: torch.Tensor, prev_flat: torch.Tensor, cur_mask_flat: torch.Tensor,
    prev_mask_flat: torch.Tensor, table: torch.Tensor, dphi: torch.Tensor, max_cols: int, max_rows: int,
    need_cur: bool, need_prev: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients of the packed B_cur and B_prev buffers (empty where not asked for)."""
    return _backward_kernels(grad_losses, cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, dphi, max_cols,
                             max_rows, need_cur, need_prev)  # fmt: skip


@triton_ago_gram_bwd.register_fake
def _(grad_losses, cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, dphi, max_cols, max_rows, need_cur,
      need_prev):  # fmt: skip
    return (torch.empty_like(cur_flat) if need_cur else cur_flat.new_empty(0),
            torch.empty_like(prev_flat) if need_prev else prev_flat.new_empty(0))  # fmt: skip


def _setup_context(ctx, inputs, output):
    cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, _, _, max_cols, max_rows = inputs
    ctx.save_for_backward(cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, output[1])
    ctx.max_cols, ctx.max_rows = max_cols, max_rows


def _gradients(ctx, grad_losses, backward_kernels):
    """The packed inputs' gradients (None where not needed), computed by `backward_kernels` (the registered
    backward op, or its body in eager mode)."""
    cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, dphi = ctx.saved_tensors
    need_cur, need_prev = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_cur, grad_prev = backward_kernels(
        grad_losses.contiguous(), cur_flat, prev_flat, cur_mask_flat, prev_mask_flat, table, dphi, ctx.max_cols,
        ctx.max_rows, need_cur, need_prev,
    )  # fmt: skip
    no_grad_for_the_rest = (None,) * 7  # masks, table, p and the sizes
    return (grad_cur if need_cur else None), (grad_prev if need_prev else None), *no_grad_for_the_rest


def _backward(ctx, grad_losses, grad_dphi):
    return _gradients(ctx, grad_losses, torch.ops.rank1.triton_ago_gram_bwd)


triton_ago_gram_fwd.register_autograd(_backward, setup_context=_setup_context)


_EagerAgoGram = eager_function("_EagerAgoGram", _forward, _setup_context, _gradients, _backward_kernels)


# Per-layer tables by (device, layer shapes): after the first call a step reuses its table, so no host-to-device copy
# happens in later steps (a CUDA graph may capture them). The key is small; models have a handful of layer layouts.
_TABLE_CACHE: dict[tuple, torch.Tensor] = {}


def _layer_table(table_rows: list[list[int]], device: torch.device, key: tuple) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced: the table becomes a constant of the graph
        return torch.tensor(table_rows, dtype=torch.int64, device=device)
    table = _TABLE_CACHE.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the grouped AGO loss copies its per-layer table to the GPU on the first call for these layer shapes, "
                "which a CUDA graph capture cannot hold: run one step (forward and backward) before capturing"
            )
        # A normal tensor even when first made under inference_mode: training steps save it for backward.
        with torch.inference_mode(False):
            table = _TABLE_CACHE[key] = torch.tensor(table_rows, dtype=torch.int64, device=device)
    return table


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row-major flattening of every matrix (or vector), one after another; never empty (kernels need a real
    pointer: an empty result gets one zero, padded on so that the autograd graph to the inputs stays). Matrices
    sharing a column count (a model's pools usually share r) are stacked along their rows: the same bytes in the same
    order, without a reshape per layer in the forward and a view node per layer in autograd."""
    if tensors[0].dim() == 1 or all(t.shape[1] == tensors[0].shape[1] for t in tensors):
        flat = torch.cat(tensors).reshape(-1)
    else:
        flat = torch.cat([t.reshape(-1) for t in tensors])
    return flat if flat.numel() else torch.nn.functional.pad(flat, (0, 1))


def triton_ago_grouped(
    B_curs: Sequence[torch.Tensor], B_prevs: Sequence[torch.Tensor], cur_masks: Sequence[torch.Tensor],
    prev_masks: Sequence[torch.Tensor], p: int = 1,
) -> torch.Tensor:  # fmt: skip
    """Per-layer AGO losses (n_layers,) in the layers' dtype, one launch for all layers; arguments as
    `ago_loss_grouped_ref` (validated by `check_ago_inputs`; all layers share one dtype and device).
    Gradients flow to B_curs and to B_prevs where they require grad."""
    if not B_curs:
        return torch.zeros(0)
    dtype, device = B_curs[0].dtype, B_curs[0].device
    table_rows, cur_offset, prev_offset, cur_mask_offset, prev_mask_offset, gram_offset = [], 0, 0, 0, 0, 0
    for B_cur, B_prev in zip(B_curs, B_prevs):
        (rows, cur_cols), prev_cols = B_cur.shape, B_prev.shape[1]
        table_rows.append([cur_offset, prev_offset, rows, cur_cols, prev_cols, cur_mask_offset, prev_mask_offset,
                           gram_offset])  # fmt: skip
        cur_offset += rows * cur_cols
        prev_offset += rows * prev_cols
        cur_mask_offset += cur_cols
        prev_mask_offset += prev_cols
        gram_offset += cur_cols * prev_cols
    # Built from shapes only (host integers): no value is read back from the device.
    shapes_key = (device, tuple(tuple(b.shape) for b in B_curs), tuple(b.shape[1] for b in B_prevs))
    table = _layer_table(table_rows, device, shapes_key)
    max_cols = max(max(b.shape[1] for b in B_curs), max(b.shape[1] for b in B_prevs))
    max_rows = max(b.shape[0] for b in B_curs)
    # Masks are packed, then cast: two launches, not one cast per layer (288 for CLIP's 144 layers).
    inputs = (_pack(B_curs), _pack(B_prevs), _pack(cur_masks).to(torch.float32), _pack(prev_masks).to(torch.float32),
              table, p, gram_offset, max_cols, max_rows)  # fmt: skip
    return call(torch.ops.rank1.triton_ago_gram_fwd, _EagerAgoGram, inputs).to(dtype)


def ago_refuse_reason(B_curs: Sequence[torch.Tensor], B_prevs: Sequence[torch.Tensor]) -> Optional[str]:
    """Why one grouped launch cannot take these layers, or None."""
    layers = [*B_curs, *B_prevs]
    if layers and any(t.dtype != layers[0].dtype or t.device != layers[0].device for t in layers):
        return ("the grouped launch needs every layer's B in one dtype and on one device; cast them alike or use "
                "backend='reference'")  # fmt: skip
    return None
