"""The pool linear op in Triton: fused forward and backward, registered as torch ops under ``rank1::triton_*``.

    y[row] = x[row] W^T + bias + scaling * sum_j gates[s, j] (lora_input[row] . A[idx[s, j]]) B[:, idx[s, j]]

with s = row // tokens_per_sample (the reference is `rank1_kernels.pool_linear.rank1_pool_linear_ref`).

Two variants compute it, both in the same three kernels:
    "gather"  row tiles never cross a sample, so each tile reads only its sample's k rows of A and k columns of B.
    "mask"    shrink-all + mask: all r experts are projected, a dense (n_samples, r) gate matrix that is zero outside
              the chosen experts masks them. Tiles may span samples; better when r is small or samples are short.
A tile-row "group" is a sample (gather) or the whole batch (mask); `table[group, slot]` names the expert of each slot.

Kernels:
    _shrink_kernel        u[row, slot] = in[row] . proj[table[group, slot]]             (rank intermediate, fp32)
    _fused_linear_kernel  y = x W^T + bias + (u * gate * scaling) @ expand[:, table]^T  (expand folded into the
                          base GEMM's fp32 accumulator, so y is written once)
    _group_outer_kernel   out[group, slot, :] = sum_rows_of_group (u * gate * scaling)[row, slot] * m[row, :]
    _scatter_slots_kernel out[e, :] = sum over slots p with table[p] == e of partial[p, :]  (fixed order: deterministic)

Backward reuses them: dy B_S is a shrink with proj = B^T; dx = dy W + ((dy B_S) * g * s) A_S is the fused kernel with
W^T and A^T; dA and dB are group outer products scattered to experts. W and bias stay frozen (no dW, no dbias).
Accumulation is fp32 everywhere, offsets are int64, and the forward reads no value back to the host.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .backends import frozen_base_message

VARIANTS = ("gather", "mask")

# ---- kernels -----------------------------------------------------------------------------------------------------


@triton.jit
def _group_rows(pid_m, rows_per_group, BLOCK_M: tl.constexpr):
    """The tile's group, its rows (int64, global) and which of them exist: tiles never cross a group."""
    blocks_per_group = tl.cdiv(rows_per_group, BLOCK_M)
    group = (pid_m // blocks_per_group).to(tl.int64)
    row_in_group = (pid_m % blocks_per_group) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = group * rows_per_group + row_in_group.to(tl.int64)
    return group, rows, row_in_group < rows_per_group


@triton.jit
def _shrink_kernel(
    in_ptr, stride_in_row, stride_in_col,  # (n_rows, depth): the rows to project
    proj_ptr, stride_proj_expert, stride_proj_col,  # (r, depth): A, or B^T in the backward
    table_ptr, stride_table_group, stride_table_slot,  # (n_groups, n_slots) int64 expert of each slot
    out_ptr, stride_out_row,  # (n_rows, n_slots) fp32
    rows_per_group, n_slots, depth,
    BLOCK_M: tl.constexpr, BLOCK_SLOTS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    group, rows, row_ok = _group_rows(tl.program_id(0), rows_per_group, BLOCK_M)
    slots = tl.program_id(1) * BLOCK_SLOTS + tl.arange(0, BLOCK_SLOTS)
    slot_ok = slots < n_slots
    experts = tl.load(table_ptr + group * stride_table_group + slots * stride_table_slot, mask=slot_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_SLOTS), dtype=tl.float32)
    for d0 in range(0, depth, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < depth
        rows_tile = tl.load(
            in_ptr + rows[:, None] * stride_in_row + cols[None, :] * stride_in_col,
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        )  # fmt: skip
        # Only the selected experts' rows are read: a gather of k rows of proj, transposed to (BLOCK_D, BLOCK_SLOTS).
        proj_tile = tl.load(
            proj_ptr + experts[None, :] * stride_proj_expert + cols[:, None] * stride_proj_col,
            mask=col_ok[:, None] & slot_ok[None, :], other=0.0,
        )  # fmt: skip
        if UPCAST_DOT:
            rows_tile, proj_tile = rows_tile.to(tl.float32), proj_tile.to(tl.float32)
        acc = tl.dot(rows_tile, proj_tile, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_out_row + slots[None, :], acc, mask=row_ok[:, None] & slot_ok[None, :])


@triton.jit
def _fused_linear_kernel(
    x_ptr, stride_x_row, stride_x_col,  # (n_rows, d_in)
    w_ptr, stride_w_out, stride_w_in,  # (d_out, d_in)
    bias_ptr,  # (d_out,)
    u_ptr, stride_u_row,  # (n_rows, n_slots) fp32 ungated rank activations
    gate_ptr, stride_gate_sample, stride_gate_slot,  # (n_samples, n_slots)
    expand_ptr, stride_expand_out, stride_expand_expert,  # (d_out, r): B, or A^T in the backward
    table_ptr, stride_table_group, stride_table_slot,  # (n_groups, n_slots) int64
    y_ptr, stride_y_row, stride_y_col,  # (n_rows, d_out)
    rows_per_group, tokens_per_sample, d_in, d_out, n_slots, scaling,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    group, rows, row_ok = _group_rows(tl.program_id(0), rows_per_group, BLOCK_M)
    outs = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        for k0 in range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < d_in
            x_tile = tl.load(
                x_ptr + rows[:, None] * stride_x_row + ks[None, :] * stride_x_col,
                mask=row_ok[:, None] & k_ok[None, :], other=0.0,
            )  # fmt: skip
            w_tile = tl.load(
                w_ptr + outs[None, :] * stride_w_out + ks[:, None] * stride_w_in,
                mask=k_ok[:, None] & out_ok[None, :], other=0.0,
            )  # fmt: skip
            if UPCAST_DOT:
                x_tile, w_tile = x_tile.to(tl.float32), w_tile.to(tl.float32)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)
    if HAS_LORA:
        samples = rows // tokens_per_sample
        for s0 in range(0, n_slots, BLOCK_SLOTS):
            slots = s0 + tl.arange(0, BLOCK_SLOTS)
            slot_ok = slots < n_slots
            experts = tl.load(table_ptr + group * stride_table_group + slots * stride_table_slot, mask=slot_ok, other=0)
            tile_ok = row_ok[:, None] & slot_ok[None, :]
            u = tl.load(u_ptr + rows[:, None] * stride_u_row + slots[None, :], mask=tile_ok, other=0.0)
            gate = tl.load(
                gate_ptr + samples[:, None] * stride_gate_sample + slots[None, :] * stride_gate_slot,
                mask=tile_ok, other=0.0,
            ).to(tl.float32)  # fmt: skip
            hidden = u * gate * scaling
            expand_tile = tl.load(
                expand_ptr + outs[None, :] * stride_expand_out + experts[:, None] * stride_expand_expert,
                mask=slot_ok[:, None] & out_ok[None, :], other=0.0,
            ).to(tl.float32)  # fmt: skip
            # The rank intermediate stays fp32: the expand is an fp32 product added into the base accumulator.
            acc = tl.dot(hidden, expand_tile, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_y_row + outs[None, :] * stride_y_col,
        acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :],
    )  # fmt: skip


@triton.jit
def _group_outer_kernel(
    u_ptr, stride_u_row,  # (n_rows, n_slots) fp32
    gate_ptr, stride_gate_sample, stride_gate_slot,  # (n_samples, n_slots)
    m_ptr, stride_m_row, stride_m_col,  # (n_rows, n_cols)
    out_ptr,  # (n_groups, n_slots, n_cols) fp32 contiguous
    rows_per_group, n_rows, tokens_per_sample, n_slots, n_cols, scaling,
    BLOCK_M: tl.constexpr, BLOCK_SLOTS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_SLOTS + tl.arange(0, BLOCK_SLOTS)
    slot_ok = slots < n_slots
    cols = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_SLOTS, BLOCK_C), dtype=tl.float32)
    # One program owns a whole group's sum over rows: a fixed order, no atomics, the same bits every run.
    for m0 in range(0, rows_per_group, BLOCK_M):
        row_in_group = m0 + tl.arange(0, BLOCK_M)
        rows = group * rows_per_group + row_in_group.to(tl.int64)
        row_ok = (row_in_group < rows_per_group) & (rows < n_rows)  # the last row chunk may be short
        samples = rows // tokens_per_sample
        tile_ok = slot_ok[:, None] & row_ok[None, :]
        u_t = tl.load(u_ptr + rows[None, :] * stride_u_row + slots[:, None], mask=tile_ok, other=0.0)
        gate_t = tl.load(
            gate_ptr + samples[None, :] * stride_gate_sample + slots[:, None] * stride_gate_slot,
            mask=tile_ok, other=0.0,
        ).to(tl.float32)  # fmt: skip
        m_tile = tl.load(
            m_ptr + rows[:, None] * stride_m_row + cols[None, :] * stride_m_col,
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        acc = tl.dot(u_t * gate_t * scaling, m_tile, acc, input_precision="ieee")
    out_rows = group * n_slots + slots.to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * n_cols + cols[None, :], acc, mask=slot_ok[:, None] & col_ok[None, :])


@triton.jit
def _scatter_slots_kernel(
    partial_ptr,  # (n_pairs, n_cols) fp32 contiguous: one row per (group, slot)
    table_ptr,  # (n_pairs,) int64 expert of each row
    out_ptr, stride_out_expert, stride_out_col,  # (r, n_cols) view of the result
    n_pairs, n_cols,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    expert = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, n_pairs, BLOCK_P):
        pairs = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        hit = (tl.load(table_ptr + pairs, mask=pairs < n_pairs, other=-1) == expert) & (pairs < n_pairs)
        values = tl.load(partial_ptr + pairs[:, None] * n_cols + cols[None, :], mask=hit[:, None] & col_ok[None, :],
                         other=0.0)  # fmt: skip
        acc += tl.sum(values, axis=0)
    out = out_ptr + expert * stride_out_expert + cols * stride_out_col
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# ---- launchers -----------------------------------------------------------------------------------------------------


def _block(size: int, cap: int) -> int:
    """A power-of-two tile edge for a dimension of `size`: at least 16 (tl.dot's minimum), at most `cap`."""
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


def _dot_config(dtype: torch.dtype) -> dict:
    """tl.dot settings for input tiles of `dtype`. fp32 gets true fp32 products (the reference's matmul does not use
    TF32 by default; bf16/fp16 ignore the precision). Triton's interpreter multiplies the raw bits of bf16 operands
    (triton-lang/triton#11584, unsupported upstream), so there bf16 tiles are widened to fp32 first: exact, as bf16
    products fit in fp32, which is what a bf16 MMA with an fp32 accumulator computes."""
    upcast = dtype == torch.bfloat16 and is_interpreted()
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST_DOT": upcast}


class _Routing:
    """Tile groups, their expert table and per-sample gates for one variant. All tensors stay on the device."""

    def __init__(self, idx: torch.Tensor, gates: torch.Tensor, n_experts: int, n_rows: int, tokens_per_sample: int,
                 variant: str):  # fmt: skip
        if variant == "gather":
            self.table, self.gates = idx, gates
            self.rows_per_group, self.n_groups, self.n_slots = tokens_per_sample, idx.shape[0], idx.shape[1]
        elif variant == "mask":
            # Dense gates through a one-hot sum, not a scatter: duplicates add up deterministically, and nothing is
            # read back to the host (F.one_hot would check the index range there on some devices).
            experts = torch.arange(n_experts, device=idx.device)
            one_hot = (idx.unsqueeze(-1) == experts).to(torch.float32)  # (n_samples, k, r)
            self.gates = (gates.to(torch.float32).unsqueeze(-1) * one_hot).sum(1)  # (n_samples, r)
            self.table = experts.unsqueeze(0)  # one group whose slots are all experts
            self.rows_per_group, self.n_groups, self.n_slots = n_rows, 1, n_experts
        else:
            raise ValueError(f"variant={variant!r} is not supported; expected one of {', '.join(map(repr, VARIANTS))}")
        self.tokens_per_sample = tokens_per_sample
        self.variant = variant

    def table_strides(self) -> tuple[int, int]:
        # The mask variant's single table row serves every group (stride 0), whatever rows_per_group is.
        return (0 if self.variant == "mask" else self.table.stride(0)), self.table.stride(1)


def _shrink(rows: torch.Tensor, proj: torch.Tensor, routing: _Routing) -> torch.Tensor:
    """rows: (n_rows, depth), proj: (r, depth) -> fp32 (n_rows, n_slots), u[row, slot] = rows[row] . proj[expert]."""
    n_rows, depth = rows.shape
    out = torch.empty(n_rows, routing.n_slots, device=rows.device, dtype=torch.float32)
    block_m = _block(routing.rows_per_group, 64)
    block_slots = _block(routing.n_slots, 32)
    grid = (routing.n_groups * triton.cdiv(routing.rows_per_group, block_m), triton.cdiv(routing.n_slots, block_slots))
    _shrink_kernel[grid](
        rows, rows.stride(0), rows.stride(1), proj, proj.stride(0), proj.stride(1),
        routing.table, *routing.table_strides(), out, out.stride(0),
        routing.rows_per_group, routing.n_slots, depth,
        BLOCK_M=block_m, BLOCK_SLOTS=block_slots, BLOCK_D=_block(depth, 64), **_dot_config(rows.dtype),
    )  # fmt: skip
    return out


def _fused_linear(
    x: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    u: Optional[torch.Tensor], expand: torch.Tensor, routing: _Routing, scaling: float,
    n_rows: int, out_features: int, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """(n_rows, out_features) = x weight^T + bias + (u * gates * scaling) expand[:, table]^T; x/weight may be None
    (no base product) and u may be None (no rank part). weight: (out_features, d_in), expand: (out_features, r)."""
    y = torch.empty(n_rows, out_features, device=expand.device, dtype=dtype)
    has_base, has_lora = x is not None, u is not None
    d_in = x.shape[1] if has_base else 0
    # Unused pointer arguments still need a tensor; `expand` stands in, and the constexpr flags skip every access.
    x_arg, w_arg = (x, weight) if has_base else (expand, expand)
    u_arg = u if has_lora else expand
    block_m = _block(routing.rows_per_group, 64)
    block_n = _block(out_features, 64)
    grid = (routing.n_groups * triton.cdiv(routing.rows_per_group, block_m), triton.cdiv(out_features, block_n))
    _fused_linear_kernel[grid](
        x_arg, x_arg.stride(0), x_arg.stride(1), w_arg, w_arg.stride(0), w_arg.stride(1),
        bias if bias is not None else expand,
        u_arg, u_arg.stride(0), routing.gates, routing.gates.stride(0), routing.gates.stride(1),
        expand, expand.stride(0), expand.stride(1), routing.table, *routing.table_strides(),
        y, y.stride(0), y.stride(1),
        routing.rows_per_group, routing.tokens_per_sample, d_in, out_features, routing.n_slots, scaling,
        HAS_BASE=has_base, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block(d_in, 64), BLOCK_SLOTS=_block(routing.n_slots, 32),
        **_dot_config(dtype),
    )  # fmt: skip
    return y


# The mask variant's rows form one group; its dA / dB sums run over row chunks (at most _MASK_MAX_CHUNKS of at least
# _MASK_ROW_CHUNK rows) so that more programs share them, and the chunk partials are summed in a fixed order after.
_MASK_ROW_CHUNK = 128
_MASK_MAX_CHUNKS = 16


def _expert_grad(u: torch.Tensor, m: torch.Tensor, routing: _Routing, scaling: float, n_experts: int,
                 out: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """out[e, c] (out: (r, n_cols), any strides) = sum over rows and slots choosing e of (u * gates * scaling) m."""
    n_rows, n_cols = m.shape
    if routing.variant == "mask":
        rows_per_group = max(_MASK_ROW_CHUNK, triton.cdiv(n_rows, _MASK_MAX_CHUNKS))
        n_groups = triton.cdiv(n_rows, rows_per_group)
    else:
        rows_per_group, n_groups = routing.rows_per_group, routing.n_groups
    partial = torch.empty(n_groups, routing.n_slots, n_cols, device=m.device, dtype=torch.float32)
    block_slots, block_c = _block(routing.n_slots, 32), _block(n_cols, 64)
    grid = (n_groups, triton.cdiv(routing.n_slots, block_slots), triton.cdiv(n_cols, block_c))
    _group_outer_kernel[grid](
        u, u.stride(0), routing.gates, routing.gates.stride(0), routing.gates.stride(1), m, m.stride(0), m.stride(1),
        partial, rows_per_group, n_rows, routing.tokens_per_sample, routing.n_slots, n_cols, scaling,
        BLOCK_M=_block(rows_per_group, 32), BLOCK_SLOTS=block_slots, BLOCK_C=block_c,
    )  # fmt: skip
    if routing.variant == "mask":  # the slots are the experts in order: sum the row chunks
        out.copy_(partial.sum(0))
        return out
    table = routing.table.reshape(-1)
    _scatter_slots_kernel[(n_experts, triton.cdiv(n_cols, block_c))](
        partial, table, out, out.stride(0), out.stride(1), table.numel(), n_cols, BLOCK_P=16, BLOCK_C=block_c
    )
    return out


def choose_variant(n_experts: int, k: int, tokens_per_sample: int) -> str:
    """The dispatcher between the variants, from shapes only (no device data, so graph- and capture-safe).

    Shrink-all + mask pays r / k times the gather's shrink and expand work, but its tiles span samples: it wins when
    r is small (<= 32), when most experts are chosen anyway (r <= 2k), or when samples are too short (< 16 tokens)
    to fill the gather's sample-aligned 16-row tiles."""
    if n_experts <= 32 or n_experts <= 2 * k or tokens_per_sample < 16:
        return "mask"
    return "gather"


# ---- registered ops ------------------------------------------------------------------------------------------------


@torch.library.custom_op("rank1::triton_pool_linear_fwd", mutates_args=())
def triton_pool_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
    idx: torch.Tensor, gates: torch.Tensor, scaling: float, tokens_per_sample: int, lora_input: Optional[torch.Tensor],
    variant: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns y (n_rows, d_out) and the ungated rank activations u (n_rows, k or r) in fp32, kept for backward."""
    n_rows, n_experts = x.shape[0], A.shape[0]
    routing = _Routing(idx, gates, n_experts, n_rows, tokens_per_sample, variant)
    if n_rows == 0:
        return x.new_empty(0, weight.shape[0]), x.new_empty(0, routing.n_slots, dtype=torch.float32)
    u = _shrink(x if lora_input is None else lora_input, A, routing)
    y = _fused_linear(x, weight, bias, u, B, routing, scaling, n_rows, weight.shape[0], x.dtype)
    return y, u


@triton_pool_linear_fwd.register_fake
def _(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input, variant):
    n_slots = idx.shape[1] if variant == "gather" else A.shape[0]
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], n_slots, dtype=torch.float32)


@torch.library.custom_op("rank1::triton_pool_linear_bwd", mutates_args=())
def triton_pool_linear_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor,
    gates: torch.Tensor, scaling: float, tokens_per_sample: int, lora_input: Optional[torch.Tensor], u: torch.Tensor,
    variant: str, need_x: bool, need_lora_input: bool, need_A: bool, need_B: bool, need_gates: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (dx, dlora_input, dA, dB, dgates); each one not asked for is an empty tensor. With lora_input None
    the rank path's input gradient is part of dx."""
    n_rows, d_in = x.shape
    n_experts = A.shape[0]
    routing = _Routing(idx, gates, n_experts, n_rows, tokens_per_sample, variant)
    # A registered op's outputs may not alias each other: one placeholder (or zero result) each.
    grad_x, grad_lora_input, grad_A, grad_B, grad_gates = (
        torch.zeros_like(like) if need else x.new_empty(0)
        for need, like in ((need_x, x), (need_lora_input, x), (need_A, A), (need_B, B), (need_gates, gates))
    )
    if n_rows == 0:
        return grad_x, grad_lora_input, grad_A, grad_B, grad_gates
    rank_input_grad_in_dx = lora_input is None and need_x
    grad_u = None
    if rank_input_grad_in_dx or need_lora_input or need_A or need_gates:
        grad_u = _shrink(grad_y, B.t(), routing)  # (dy B_S): fp32 (n_rows, n_slots), ungated
    if need_x:
        grad_x = _fused_linear(
            grad_y, weight.t(), None, grad_u if rank_input_grad_in_dx else None, A.t(), routing, scaling,
            n_rows, d_in, x.dtype,
        )  # fmt: skip
    if need_lora_input:
        grad_lora_input = _fused_linear(None, None, None, grad_u, A.t(), routing, scaling, n_rows, d_in, x.dtype)
    if need_A:
        _expert_grad(grad_u, x if lora_input is None else lora_input, routing, scaling, n_experts, grad_A)
    if need_B:
        _expert_grad(u, grad_y, routing, scaling, n_experts, grad_B.t())
    if need_gates:
        per_sample = (grad_u * u).reshape(-1, tokens_per_sample, routing.n_slots).sum(1) * scaling
        if variant == "mask":
            per_sample = per_sample.gather(1, idx)
        grad_gates = per_sample.to(gates.dtype)
    return grad_x, grad_lora_input, grad_A, grad_B, grad_gates


@triton_pool_linear_bwd.register_fake
def _(grad_y, x, weight, A, B, idx, gates, scaling, tokens_per_sample, lora_input, u, variant, need_x,
      need_lora_input, need_A, need_B, need_gates):  # fmt: skip
    def maybe(flag, like):
        return torch.empty_like(like) if flag else x.new_empty(0)

    return maybe(need_x, x), maybe(need_lora_input, x), maybe(need_A, A), maybe(need_B, B), maybe(need_gates, gates)


def _setup_context(ctx, inputs, output):
    x, weight, _, A, B, idx, gates, scaling, tokens_per_sample, lora_input, variant = inputs
    ctx.save_for_backward(x, weight, A, B, idx, gates, lora_input, output[1])
    ctx.scaling, ctx.tokens_per_sample, ctx.variant = scaling, tokens_per_sample, variant
    ctx.has_lora_input = lora_input is not None


def _backward(ctx, grad_y, grad_u):
    x, weight, A, B, idx, gates, lora_input, u = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if needs[1] or needs[2]:
        raise RuntimeError(frozen_base_message("Triton"))
    grads = torch.ops.rank1.triton_pool_linear_bwd(
        grad_y, x, weight, A, B, idx, gates, ctx.scaling, ctx.tokens_per_sample, lora_input, u, ctx.variant,
        needs[0], ctx.has_lora_input and needs[9], needs[3], needs[4], needs[6],
    )  # fmt: skip
    grad_x, grad_lora_input, grad_A, grad_B, grad_gates = (
        grad if need else None for grad, need in zip(grads, (needs[0], needs[9], needs[3], needs[4], needs[6]))
    )
    return grad_x, None, None, grad_A, grad_B, None, grad_gates, None, None, grad_lora_input, None


triton_pool_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- functional ----------------------------------------------------------------------------------------------------


def triton_pool_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
    idx: torch.Tensor, gates: torch.Tensor, scaling: float, tokens_per_sample: int,
    lora_input: Optional[torch.Tensor] = None, variant: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """The pool linear through the Triton kernels; arguments as `rank1_pool_linear_ref` (inputs are assumed
    validated by `check_pool_linear_inputs`). variant: "auto" (`choose_variant`), "gather" or "mask".
    Returns y (n_rows, d_out) with autograd to x, A, B, gates and lora_input."""
    if variant == "auto":
        variant = choose_variant(A.shape[0], idx.shape[1], tokens_per_sample)
    elif variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported; expected 'auto', 'gather' or 'mask'")
    y, _ = torch.ops.rank1.triton_pool_linear_fwd(
        x, weight, bias, A, B, idx, gates, float(scaling), tokens_per_sample, lora_input, variant
    )
    return y


def is_interpreted() -> bool:
    """Whether these kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_fused_linear_kernel).__name__ == "InterpretedFunction"
