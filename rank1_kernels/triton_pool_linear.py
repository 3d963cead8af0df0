"""The pool linear op in Triton: fused forward and backward, registered as torch ops under ``rank1::triton_*``.

    y[row] = x[row] W^T + bias + scaling * sum_j gates[s, j] (lora_input[row] . A[idx[s, j]]) B[:, idx[s, j]]

with s = row // tokens_per_sample (the reference is `rank1_kernels.pool_linear.rank1_pool_linear_ref`).

Two variants compute it, both in the same kernels:
    "gather"  each sample's rows read only its k rows of A and k columns of B (a row tile of the GEMM may hold
              several samples, each adding its own experts' expand; shrink and dA/dB tiles stay in one sample).
    "mask"    shrink-all + mask: all r experts are projected, a dense (n_samples, r) gate matrix that is zero outside
              the chosen experts masks them. Tiles may span samples; better when r is small or samples are short.
A tile-row "group" is a sample (gather) or the whole batch (mask). The kernels read idx and gates as given: slot j of
a gather group is expert idx[sample, j] with gate gates[sample, j]; slot e of the mask group is expert e, its gate
the sum of the sample's gates choosing e (`_gated`).

Kernels:
    _fused_linear_kernel  y = x W^T + bias + (u * gate * scaling) @ expand[:, table]^T  (expand folded into the
                          base GEMM's fp32 accumulator, so y is written once); with SHRINK it also computes u in its
                          K loop from the x tiles it loads (x read once), else u comes from:
    _shrink_kernel        u[row, slot] = in[row] . proj[table[group, slot]]             (rank intermediate, fp32)
    _group_outer_kernel   out[group, slot, :] = sum_rows_of_group (u * gate * scaling)[row, slot] * m[row, :]
    _scatter_slots_kernel out[e, :] = sum over slots p with table[p] == e of partial[p, :]  (fixed order: deterministic)
                          (both take two problems per launch, split by column block: the backward's dA and dB)
    _gate_grad_kernel     dgates[s, j] = scaling * sum over sample s's rows of u * (dy B_S) at choice j's slot
`choose_shrink` places the shrink per GEMM launch; with it separate, gather tiles of the GEMM run across samples.

Backward reuses them: dy B_S is a shrink with proj = B^T; dx = dy W + ((dy B_S) * g * s) A_S is the fused kernel with
W^T and A^T; dA and dB are group outer products scattered to experts, both in the same two launches. W and bias
stay frozen (no dW, no dbias).
The rank products (expand, dA, dB) run on tensor cores without rounding the fp32 intermediate (`_rank_dot`).
Accumulation is fp32 everywhere, offsets are int64, and the forward reads no value back to the host.
"""

import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._eager import call, eager_function
from ._launch import block as _block
from ._launch import cdiv as _cdiv
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
def _input_dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc += a @ b for tiles in the input dtype (tensor cores; fp32 inputs get true fp32 products)."""
    if UPCAST_DOT:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# Triton's interpreter casts fp32 to bf16 by truncation (and garbles subnormals); compiled kernels round to nearest
# even, as torch does. Under the interpreter only, `_to` rounds by bits, so CPU tests see the rounding a GPU does.
_ROUND_BF16_BY_BITS = tl.constexpr(type(_input_dot).__name__ == "InterpretedFunction")


@triton.jit
def _to(x, dtype: tl.constexpr):
    """An fp32 tile in `dtype`, rounded to nearest even (compiled: the cast itself)."""
    if _ROUND_BF16_BY_BITS and dtype == tl.bfloat16:  # the upper half of the rounded bits (subnormals too)
        bits = x.to(tl.uint32, bitcast=True)
        rounded = tl.where(x != x, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1))  # NaN stays a (quiet) NaN
        out = (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def _rank_dot(hidden, operand, acc, RANK_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc += hidden @ operand, hidden an fp32 tile of the rank intermediate, operand a tile in the input dtype.

    The fp32 product, on tensor cores where the dtype allows (an fp32 "ieee" dot runs on the CUDA cores, about 15x
    slower than bf16 MMA: at r = 16 that alone would cost a third of the base GEMM):
      "split3"  bf16 operand: hidden = hi + mid + lo exactly (three bf16 parts of 8 significant bits each), three
                bf16 products, each exact in fp32, summed smallest first into the fp32 accumulator;
      "tf32x3"  fp16 operand (exact in tf32): ~fp32 accuracy without fp16's range limits on hidden;
      "ieee"    fp32 operand: fp32 products, like the reference."""
    if RANK_DOT == "split3":
        hi = hidden.to(operand.dtype)
        rest = hidden - hi.to(tl.float32)
        mid = rest.to(operand.dtype)
        lo = (rest - mid.to(tl.float32)).to(operand.dtype)
        acc = _input_dot(lo, operand, acc, "ieee", UPCAST_DOT)
        acc = _input_dot(mid, operand, acc, "ieee", UPCAST_DOT)
        acc = _input_dot(hi, operand, acc, "ieee", UPCAST_DOT)
    else:
        acc = tl.dot(hidden, operand.to(tl.float32), acc, input_precision=RANK_DOT)
    return acc


@triton.jit
def _slot_experts(idx_ptr, stride_idx_sample, stride_idx_slot, sample, slots, slot_ok, DENSE_SLOTS: tl.constexpr):
    """The expert of each slot: idx[sample, slot] (gather), or the slot itself (mask: the slots are all r experts)."""
    if DENSE_SLOTS:
        return slots.to(tl.int64)
    return tl.load(idx_ptr + sample * stride_idx_sample + slots * stride_idx_slot, mask=slot_ok, other=0)


@triton.jit
def _gated(u, gate_ptr, stride_gate_sample, stride_gate_slot, idx_ptr, stride_idx_sample, stride_idx_slot, samples,
           slots, row_ok, slot_ok, n_chosen, scaling, DENSE_SLOTS: tl.constexpr):  # fmt: skip
    """u * gates * scaling for a (rows, slots) fp32 tile of rank activations, each row with its sample's gates.

    Gather: the slots are the sample's choices, gates[sample, slot]. Mask: the slots are all r experts, and an
    expert's gate is the sum of the sample's gates that chose it (zero if none): built here from idx and gates, so
    no dense gate matrix is made (and launched for) outside the kernel."""
    tile_ok = row_ok[:, None] & slot_ok[None, :]
    if DENSE_SLOTS:
        gate = tl.zeros_like(u)
        for j in range(0, n_chosen):
            chosen = tl.load(idx_ptr + samples * stride_idx_sample + j * stride_idx_slot, mask=row_ok, other=-1)
            weight = tl.load(gate_ptr + samples * stride_gate_sample + j * stride_gate_slot, mask=row_ok, other=0.0)
            gate += tl.where(chosen[:, None] == slots[None, :], weight.to(tl.float32)[:, None], 0.0)
        gate = tl.where(tile_ok, gate, 0.0)
    else:
        gate = tl.load(gate_ptr + samples[:, None] * stride_gate_sample + slots[None, :] * stride_gate_slot,
                       mask=tile_ok, other=0.0).to(tl.float32)  # fmt: skip
    return u * gate * scaling


@triton.jit
def _gather_expand(expand_ptr, stride_expand_out, stride_expand_expert, experts, slot_ok, outs, out_ok):
    """The chosen experts' columns of expand (B, or A^T in the backward) as a (slots, outs) tile, input dtype."""
    return tl.load(expand_ptr + outs[None, :] * stride_expand_out + experts[:, None] * stride_expand_expert,
                   mask=slot_ok[:, None] & out_ok[None, :], other=0.0)  # fmt: skip


@triton.jit
def _add_stored_expand(
    acc, u_ptr, stride_u_row, gate_ptr, stride_gate_sample, stride_gate_slot, idx_ptr, stride_idx_sample,
    stride_idx_slot, expand_ptr, stride_expand_out, stride_expand_expert, rows, row_ok, samples, group, outs, out_ok,
    n_slots, n_chosen, scaling, DENSE_SLOTS: tl.constexpr, BLOCK_SLOTS: tl.constexpr, RANK_DOT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """acc += (u * gates * scaling) @ expand[:, experts]^T over every slot of `group` (a sample, or the mask group),
    u read back from memory; rows outside row_ok add nothing. The rank intermediate stays fp32: its product with the
    expand goes into the base's fp32 accumulator."""
    for s0 in range(0, n_slots, BLOCK_SLOTS):
        slots = s0 + tl.arange(0, BLOCK_SLOTS)
        slot_ok = slots < n_slots
        experts = _slot_experts(idx_ptr, stride_idx_sample, stride_idx_slot, group, slots, slot_ok, DENSE_SLOTS)
        u = tl.load(u_ptr + rows[:, None] * stride_u_row + slots[None, :], mask=row_ok[:, None] & slot_ok[None, :],
                    other=0.0)  # fmt: skip
        hidden = _gated(u, gate_ptr, stride_gate_sample, stride_gate_slot, idx_ptr, stride_idx_sample, stride_idx_slot,
                        samples, slots, row_ok, slot_ok, n_chosen, scaling, DENSE_SLOTS)  # fmt: skip
        expand_tile = _gather_expand(expand_ptr, stride_expand_out, stride_expand_expert, experts, slot_ok, outs,
                                     out_ok)  # fmt: skip
        acc = _rank_dot(hidden, expand_tile, acc, RANK_DOT, UPCAST_DOT)
    return acc


@triton.jit
def _shrink_kernel(
    in_ptr, stride_in_row, stride_in_col,  # (n_rows, depth): the rows to project
    proj_ptr, stride_proj_expert, stride_proj_col,  # (r, depth): A, or B^T in the backward
    idx_ptr, stride_idx_sample, stride_idx_slot,  # (n_samples, k) int64 chosen experts
    out_ptr, stride_out_row,  # (n_rows, n_slots) fp32
    rows_per_group, n_slots, depth,
    DENSE_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SLOTS: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    group, rows, row_ok = _group_rows(tl.program_id(0), rows_per_group, BLOCK_M)
    slots = tl.program_id(1) * BLOCK_SLOTS + tl.arange(0, BLOCK_SLOTS)
    slot_ok = slots < n_slots
    experts = _slot_experts(idx_ptr, stride_idx_sample, stride_idx_slot, group, slots, slot_ok, DENSE_SLOTS)
    acc = tl.zeros((BLOCK_M, BLOCK_SLOTS), dtype=tl.float32)
    for d0 in range(0, depth, BLOCK_D):
        # int64: a column-major input's column stride is n_rows, and col * stride passes 2^31 at real sizes.
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
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
        acc = _input_dot(rows_tile, proj_tile, acc, DOT_PRECISION, UPCAST_DOT)
    tl.store(out_ptr + rows[:, None] * stride_out_row + slots[None, :], acc, mask=row_ok[:, None] & slot_ok[None, :])


@triton.jit
def _fused_linear_kernel(
    x_ptr, stride_x_row, stride_x_col,  # (n_rows, depth): x, or dy in the backward
    w_ptr, stride_w_out, stride_w_in,  # (n_out, depth) view: W, or W^T in the backward
    bias_ptr,  # (n_out,)
    u_ptr, stride_u_row,  # (n_rows, n_slots) fp32 ungated rank activations: read, or written when SHRINK
    shrink_in_ptr, stride_shrink_in_row, stride_shrink_in_col,  # (n_rows, depth) rows to project if SHRINK_OWN_INPUT
    proj_ptr, stride_proj_expert, stride_proj_col,  # (r, depth): A, or B^T in the backward (SHRINK only)
    gate_ptr, stride_gate_sample, stride_gate_slot,  # (n_samples, k) gates of the chosen experts
    expand_ptr, stride_expand_out, stride_expand_expert,  # (n_out, r): B, or A^T in the backward
    idx_ptr, stride_idx_sample, stride_idx_slot,  # (n_samples, k) int64 chosen experts
    y_ptr, stride_y_row, stride_y_col,  # (n_rows, n_out)
    rows_per_group, tokens_per_sample, depth, n_out, n_slots, n_chosen, scaling, n_tiles_n,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SHRINK: tl.constexpr,
    SHRINK_OWN_INPUT: tl.constexpr, SPAN_SAMPLES: tl.constexpr, DENSE_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, RANK_DOT: tl.constexpr,
):  # fmt: skip
    # Column tiles of one row tile are neighbours in launch order: they share the row tile's x (and A) through L2.
    pid = tl.program_id(0)
    group, rows, row_ok = _group_rows(pid // n_tiles_n, rows_per_group, BLOCK_M)
    outs = (pid % n_tiles_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < n_out
    samples = rows // tokens_per_sample
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SHRINK:  # BLOCK_SLOTS covers every slot: u is computed in the K loop below, from the x tiles already loaded
        slots = tl.arange(0, BLOCK_SLOTS)
        slot_ok = slots < n_slots
        experts = _slot_experts(idx_ptr, stride_idx_sample, stride_idx_slot, group, slots, slot_ok, DENSE_SLOTS)
        u = tl.zeros((BLOCK_M, BLOCK_SLOTS), dtype=tl.float32)
    if HAS_BASE:
        for k0 in range(0, depth, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # int64 as in _shrink_kernel (column-major x or dy)
            k_ok = ks < depth
            x_tile = tl.load(
                x_ptr + rows[:, None] * stride_x_row + ks[None, :] * stride_x_col,
                mask=row_ok[:, None] & k_ok[None, :], other=0.0,
            )  # fmt: skip
            w_tile = tl.load(
                w_ptr + outs[None, :] * stride_w_out + ks[:, None] * stride_w_in,
                mask=k_ok[:, None] & out_ok[None, :], other=0.0,
            )  # fmt: skip
            if SHRINK:
                if SHRINK_OWN_INPUT:
                    shrink_tile = tl.load(
                        shrink_in_ptr + rows[:, None] * stride_shrink_in_row + ks[None, :] * stride_shrink_in_col,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                    )  # fmt: skip
                else:
                    shrink_tile = x_tile
                proj_tile = tl.load(
                    proj_ptr + experts[None, :] * stride_proj_expert + ks[:, None] * stride_proj_col,
                    mask=k_ok[:, None] & slot_ok[None, :], other=0.0,
                )  # fmt: skip
                u = _input_dot(shrink_tile, proj_tile, u, DOT_PRECISION, UPCAST_DOT)
            acc = _input_dot(x_tile, w_tile, acc, DOT_PRECISION, UPCAST_DOT)
    if SHRINK:
        # Every column tile computed the same u; the first one keeps it for the backward (or for dA and dgates).
        tile_ok = row_ok[:, None] & slot_ok[None, :]
        tl.store(u_ptr + rows[:, None] * stride_u_row + slots[None, :], u, mask=tile_ok & (pid % n_tiles_n == 0))
        if HAS_LORA:
            hidden = _gated(u, gate_ptr, stride_gate_sample, stride_gate_slot, idx_ptr, stride_idx_sample,
                            stride_idx_slot, samples, slots, row_ok, slot_ok, n_chosen, scaling, DENSE_SLOTS)
            expand_tile = _gather_expand(expand_ptr, stride_expand_out, stride_expand_expert, experts, slot_ok, outs,
                                         out_ok)  # fmt: skip
            acc = _rank_dot(hidden, expand_tile, acc, RANK_DOT, UPCAST_DOT)
    elif HAS_LORA and SPAN_SAMPLES:
        # Gather tiles that span samples (one group of all rows, the table per sample): each sample in the tile adds
        # its own experts' expand for its own rows, so the base GEMM pads no row to a sample boundary.
        first_row = (pid // n_tiles_n).to(tl.int64) * BLOCK_M
        last_row = tl.minimum(first_row + BLOCK_M, rows_per_group) - 1
        for sample in range(first_row // tokens_per_sample, last_row // tokens_per_sample + 1):
            in_sample = row_ok & (samples == sample)
            acc = _add_stored_expand(
                acc, u_ptr, stride_u_row, gate_ptr, stride_gate_sample, stride_gate_slot, idx_ptr, stride_idx_sample,
                stride_idx_slot, expand_ptr, stride_expand_out, stride_expand_expert, rows, in_sample, samples, sample,
                outs, out_ok, n_slots, n_chosen, scaling, False, BLOCK_SLOTS, RANK_DOT, UPCAST_DOT,
            )  # fmt: skip
    elif HAS_LORA:
        acc = _add_stored_expand(
            acc, u_ptr, stride_u_row, gate_ptr, stride_gate_sample, stride_gate_slot, idx_ptr, stride_idx_sample,
            stride_idx_slot, expand_ptr, stride_expand_out, stride_expand_expert, rows, row_ok, samples, group, outs,
            out_ok, n_slots, n_chosen, scaling, DENSE_SLOTS, BLOCK_SLOTS, RANK_DOT, UPCAST_DOT,
        )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_y_row + outs[None, :] * stride_y_col,
        _to(acc, y_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :],
    )  # fmt: skip


@triton.jit
def _group_outer_tile(
    u_ptr, stride_u_row, m_ptr, stride_m_row, stride_m_col, out_ptr, n_cols, col_block,
    gate_ptr, stride_gate_sample, stride_gate_slot, idx_ptr, stride_idx_sample, stride_idx_slot,
    group, slots, slot_ok, rows_per_group, n_rows, tokens_per_sample, n_chosen, n_slots, scaling,
    DENSE_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SLOTS: tl.constexpr, BLOCK_C: tl.constexpr,
    RANK_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """out[group, slot, c] = sum over the group's rows of (u * gate * scaling)[row, slot] m[row, c], for one block of
    slots and of columns. One program owns a whole group's sum over rows: a fixed order, no atomics."""
    cols = col_block.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_SLOTS, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, rows_per_group, BLOCK_M):
        row_in_group = m0 + tl.arange(0, BLOCK_M)
        rows = group * rows_per_group + row_in_group.to(tl.int64)
        row_ok = (row_in_group < rows_per_group) & (rows < n_rows)  # the last row chunk may be short
        samples = rows // tokens_per_sample
        u = tl.load(u_ptr + rows[:, None] * stride_u_row + slots[None, :], mask=row_ok[:, None] & slot_ok[None, :],
                    other=0.0)  # fmt: skip
        hidden = _gated(u, gate_ptr, stride_gate_sample, stride_gate_slot, idx_ptr, stride_idx_sample, stride_idx_slot,
                        samples, slots, row_ok, slot_ok, n_chosen, scaling, DENSE_SLOTS)  # fmt: skip
        m_tile = tl.load(
            m_ptr + rows[:, None] * stride_m_row + cols[None, :] * stride_m_col,
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        )  # fmt: skip
        acc = _rank_dot(tl.trans(hidden), m_tile, acc, RANK_DOT, UPCAST_DOT)
    out_rows = group * n_slots + slots.to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * n_cols + cols[None, :], acc, mask=slot_ok[:, None] & col_ok[None, :])


@triton.jit
def _group_outer_kernel(
    u_a_ptr, stride_u_a_row, m_a_ptr, stride_m_a_row, stride_m_a_col, out_a_ptr, n_cols_a, n_col_blocks_a,
    u_b_ptr, stride_u_b_row, m_b_ptr, stride_m_b_row, stride_m_b_col, out_b_ptr, n_cols_b,
    gate_ptr, stride_gate_sample, stride_gate_slot,  # (n_samples, k) gates of the chosen experts
    idx_ptr, stride_idx_sample, stride_idx_slot,  # (n_samples, k) int64 chosen experts
    rows_per_group, n_rows, tokens_per_sample, n_slots, n_chosen, scaling,
    DENSE_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SLOTS: tl.constexpr, BLOCK_C: tl.constexpr,
    RANK_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Two problems in one launch (the backward's dA and dB partials): u (n_rows, n_slots) fp32, m (n_rows, n_cols),
    out (n_groups, n_slots, n_cols) fp32 contiguous each. Column blocks [0, n_col_blocks_a) are problem a's, the rest
    problem b's (a launch for one problem passes it as both, with every column block a's). Each branch calls the
    tile with its own arguments, so the JIT may specialize a's and b's strides differently."""
    group = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_SLOTS + tl.arange(0, BLOCK_SLOTS)
    slot_ok = slots < n_slots
    col_block = tl.program_id(2)
    if col_block < n_col_blocks_a:
        _group_outer_tile(u_a_ptr, stride_u_a_row, m_a_ptr, stride_m_a_row, stride_m_a_col, out_a_ptr, n_cols_a,
                          col_block, gate_ptr, stride_gate_sample, stride_gate_slot, idx_ptr, stride_idx_sample,
                          stride_idx_slot, group, slots, slot_ok, rows_per_group, n_rows, tokens_per_sample, n_chosen,
                          n_slots, scaling, DENSE_SLOTS, BLOCK_M, BLOCK_SLOTS, BLOCK_C, RANK_DOT, UPCAST_DOT)
    else:
        _group_outer_tile(u_b_ptr, stride_u_b_row, m_b_ptr, stride_m_b_row, stride_m_b_col, out_b_ptr, n_cols_b,
                          col_block - n_col_blocks_a, gate_ptr, stride_gate_sample, stride_gate_slot, idx_ptr,
                          stride_idx_sample, stride_idx_slot, group, slots, slot_ok, rows_per_group, n_rows,
                          tokens_per_sample, n_chosen, n_slots, scaling, DENSE_SLOTS, BLOCK_M, BLOCK_SLOTS, BLOCK_C,
                          RANK_DOT, UPCAST_DOT)  # fmt: skip


@triton.jit
def _gate_grad_kernel(
    u_ptr, stride_u_row, grad_u_ptr, stride_grad_u_row,  # (n_rows, n_slots) fp32 each: u and dy B_S
    idx_ptr, stride_idx_sample, stride_idx_slot,  # (n_samples, k) int64
    out_ptr, stride_out_sample, stride_out_slot,  # (n_samples, k) in the gates' dtype
    tokens_per_sample, n_chosen, scaling,
    DENSE_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dgates[s, j] = scaling * sum over sample s's rows of u * (dy B_S) at the slot of choice j (slot j, gather; the
    chosen expert idx[s, j], mask). One program per sample and block of choices: a fixed summation order."""
    sample = tl.program_id(0).to(tl.int64)
    choices = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    choice_ok = choices < n_chosen
    if DENSE_SLOTS:
        slots = tl.load(idx_ptr + sample * stride_idx_sample + choices * stride_idx_slot, mask=choice_ok, other=0)
    else:
        slots = choices.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, tokens_per_sample, BLOCK_M):
        token = m0 + tl.arange(0, BLOCK_M)
        rows = sample * tokens_per_sample + token.to(tl.int64)
        tile_ok = (token < tokens_per_sample)[:, None] & choice_ok[None, :]
        u = tl.load(u_ptr + rows[:, None] * stride_u_row + slots[None, :], mask=tile_ok, other=0.0)
        grad_u = tl.load(grad_u_ptr + rows[:, None] * stride_grad_u_row + slots[None, :], mask=tile_ok, other=0.0)
        acc += u * grad_u
    total = tl.sum(acc, axis=0) * scaling
    tl.store(out_ptr + sample * stride_out_sample + choices * stride_out_slot, _to(total, out_ptr.dtype.element_ty),
             mask=choice_ok)  # fmt: skip


@triton.jit
def _scatter_slots_tile(
    partial_ptr, out_ptr, stride_out_expert, stride_out_col, n_cols, col_block, table_ptr, expert, n_pairs, n_slots,
    DENSE_SLOTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[expert, cols] = the sum, in pair order, of the partial rows whose pair holds `expert`."""
    cols = col_block.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if DENSE_SLOTS:  # pair (group, slot) holds expert `slot`: the expert's row of every group, in group order
        for group in range(n_pairs // n_slots):
            acc += tl.load(partial_ptr + (group * n_slots + expert) * n_cols + cols, mask=col_ok, other=0.0)
    else:
        for p0 in range(0, n_pairs, BLOCK_P):
            pairs = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
            hit = (tl.load(table_ptr + pairs, mask=pairs < n_pairs, other=-1) == expert) & (pairs < n_pairs)
            values = tl.load(partial_ptr + pairs[:, None] * n_cols + cols[None, :],
                             mask=hit[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
            acc += tl.sum(values, axis=0)
    out = out_ptr + expert * stride_out_expert + cols * stride_out_col
    tl.store(out, _to(acc, out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _scatter_slots_kernel(
    partial_a_ptr, out_a_ptr, stride_out_a_expert, stride_out_a_col, n_cols_a, n_col_blocks_a,
    partial_b_ptr, out_b_ptr, stride_out_b_expert, stride_out_b_col, n_cols_b,
    table_ptr,  # (n_pairs,) int64 expert of each partial row (gather); unused with DENSE_SLOTS
    n_pairs, n_slots,
    DENSE_SLOTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per-expert sums of `_group_outer_kernel`'s partials (n_pairs rows of n_cols, one per (group, slot)) into out
    (r, n_cols) views, for two problems split by column block as there. A fixed order: deterministic."""
    expert = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1)
    if col_block < n_col_blocks_a:
        _scatter_slots_tile(partial_a_ptr, out_a_ptr, stride_out_a_expert, stride_out_a_col, n_cols_a, col_block,
                            table_ptr, expert, n_pairs, n_slots, DENSE_SLOTS, BLOCK_P, BLOCK_C)  # fmt: skip
    else:
        _scatter_slots_tile(partial_b_ptr, out_b_ptr, stride_out_b_expert, stride_out_b_col, n_cols_b,
                            col_block - n_col_blocks_a, table_ptr, expert, n_pairs, n_slots, DENSE_SLOTS, BLOCK_P,
                            BLOCK_C)  # fmt: skip


# ---- launchers -----------------------------------------------------------------------------------------------------


def _dot_config(dtype: torch.dtype) -> dict:
    """tl.dot settings for input tiles of `dtype`. fp32 gets true fp32 products (the reference's matmul does not use
    TF32 by default; bf16/fp16 ignore the precision). Triton's interpreter multiplies the raw bits of bf16 operands
    (triton-lang/triton#11584, unsupported upstream), so there bf16 tiles are widened to fp32 first: exact, as bf16
    products fit in fp32, which is what a bf16 MMA with an fp32 accumulator computes."""
    upcast = dtype == torch.bfloat16 and is_interpreted()
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST_DOT": upcast}


_RANK_DOT = {torch.bfloat16: "split3", torch.float16: "tf32x3", torch.float32: "ieee"}  # see _rank_dot


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """Tile edges and launch settings of the fused GEMM kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Pure functions of shapes, called on every launch: cached (a model has a handful of distinct layer shapes).
@functools.lru_cache(maxsize=1024)
def gemm_tiles(dtype: torch.dtype, rows_per_group: int, n_out: int, depth: int) -> GemmTiles:
    """The fused GEMM's tiles, from the dtype and shapes only. Half inputs: 128 x 128 x 64 tiles, 8 warps, 3 stages
    (96 KiB of pipelined tiles: fits sm_80's and sm_90's shared memory; large tiles halve the operand traffic of
    64 x 64 ones); fp32 inputs (fp32 products on CUDA cores, register-bound): 64 x 64 x 32, 4 warps. Edges shrink
    to the shape (at least 16). Not yet tuned on a GPU: the bench's pinned variants are how to check them."""
    if dtype == torch.float32:
        block_m, block_n, block_k = _block(rows_per_group, 64), _block(n_out, 64), _block(depth, 32)
    else:
        block_m, block_n, block_k = _block(rows_per_group, 128), _block(n_out, 128), _block(depth, 64)
    return GemmTiles(block_m, block_n, block_k, num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=3)


SHRINKS = ("fused", "separate")
# The fused shrink holds all slots of a row tile in registers: at most this many (the mask variant's r, or k).
FUSED_SHRINK_MAX_SLOTS = 32
# ... and is recomputed by every column tile: fused while that adds at most this many MMA columns per row and depth
# unit. At an H100's ~300 bf16 FLOP per byte of HBM, 256 extra columns cost about one more read of x, which is what
# the separate kernel pays, plus its launch and the u round trip. An estimate, not a measurement.
FUSED_SHRINK_MAX_RECOMPUTED_COLUMNS = 256


@functools.lru_cache(maxsize=1024)
def choose_shrink(n_slots: int, n_out: int, depth: int, group_rows: int, n_rows: int, dtype: torch.dtype) -> str:
    """Where the GEMM launch with n_out output columns gets its rank activations, from shapes only: "fused"
    computes them inside the GEMM's K loop from the x tiles it loads anyway (x read once, one launch, but every
    column tile repeats the shrink); "separate" runs the shrink kernel first.

    The fused shrink's row tiles hold one group's slots, so they stop at group boundaries (a sample, in the gather
    variant; group_rows rows): the rows they pad count against it, as n_out columns each. The separate path's
    GEMM tiles run across samples and pad only the last one."""
    if n_slots > FUSED_SHRINK_MAX_SLOTS:
        return "separate"
    tiles = gemm_tiles(dtype, group_rows, n_out, depth)
    recomputed = _block(n_slots, FUSED_SHRINK_MAX_SLOTS) * _cdiv(n_out, tiles.block_n)
    spanning = gemm_tiles(dtype, n_rows, n_out, depth).block_m
    aligned_rows = _cdiv(n_rows, group_rows) * _cdiv(group_rows, tiles.block_m) * tiles.block_m
    padding = (aligned_rows - _cdiv(n_rows, spanning) * spanning) / max(n_rows, 1)
    extra_columns = recomputed + max(padding, 0.0) * n_out
    return "fused" if extra_columns <= FUSED_SHRINK_MAX_RECOMPUTED_COLUMNS else "separate"


class _Routing:
    """Tile groups and slots of one variant over idx and gates as given: the kernels read both directly (the mask
    variant's dense gates too), so routing launches nothing of its own."""

    def __init__(self, idx: torch.Tensor, gates: torch.Tensor, n_experts: int, n_rows: int, tokens_per_sample: int,
                 variant: str):  # fmt: skip
        if variant == "gather":  # a group per sample, whose slots are its k choices
            self.rows_per_group, self.n_groups, self.n_slots = tokens_per_sample, idx.shape[0], idx.shape[1]
        elif variant == "mask":  # one group of all rows, whose slots are all r experts
            self.rows_per_group, self.n_groups, self.n_slots = n_rows, 1, n_experts
        else:
            raise ValueError(f"variant={variant!r} is not supported; expected one of {', '.join(map(repr, VARIANTS))}")
        self.idx, self.gates, self.n_chosen = idx, gates, idx.shape[1]
        self.tokens_per_sample, self.n_rows = tokens_per_sample, n_rows
        self.variant, self.dense_slots = variant, variant == "mask"

    def kernel_args(self) -> tuple:
        """gate_ptr and its strides, then idx_ptr and its strides: the kernels' routing arguments, in order."""
        return (self.gates, self.gates.stride(0), self.gates.stride(1), self.idx, self.idx.stride(0),
                self.idx.stride(1))  # fmt: skip

    def fuse_shrink(self, shrink: str, n_out: int, depth: int, dtype: torch.dtype) -> bool:
        """Whether a GEMM launch with n_out columns computes the rank activations itself ("auto": choose_shrink)."""
        if shrink == "auto":
            shrink = choose_shrink(self.n_slots, n_out, depth, self.rows_per_group, self.n_rows, dtype)
        # With no output columns the GEMM has no tiles to compute the activations in: they get the shrink kernel.
        return shrink == "fused" and self.n_slots <= FUSED_SHRINK_MAX_SLOTS and n_out > 0


def _shrink(rows: torch.Tensor, proj: torch.Tensor, routing: _Routing) -> torch.Tensor:
    """rows: (n_rows, depth), proj: (r, depth) -> fp32 (n_rows, n_slots), u[row, slot] = rows[row] . proj[expert]."""
    n_rows, depth = rows.shape
    out = torch.empty(n_rows, routing.n_slots, device=rows.device, dtype=torch.float32)
    block_m = _block(routing.rows_per_group, 64)
    block_slots = _block(routing.n_slots, 32)
    grid = (routing.n_groups * _cdiv(routing.rows_per_group, block_m), _cdiv(routing.n_slots, block_slots))
    _shrink_kernel[grid](
        rows, rows.stride(0), rows.stride(1), proj, proj.stride(0), proj.stride(1),
        routing.idx, routing.idx.stride(0), routing.idx.stride(1), out, out.stride(0),
        routing.rows_per_group, routing.n_slots, depth, DENSE_SLOTS=routing.dense_slots,
        BLOCK_M=block_m, BLOCK_SLOTS=block_slots, BLOCK_D=_block(depth, 64), **_dot_config(rows.dtype),
    )  # fmt: skip
    return out


def _fused_linear(
    x: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], expand: torch.Tensor,
    routing: _Routing, scaling: float, n_rows: int, n_out: int, dtype: torch.dtype, *,
    u: Optional[torch.Tensor] = None, shrink_proj: Optional[torch.Tensor] = None,
    shrink_input: Optional[torch.Tensor] = None, add_rank: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # fmt: skip
    """y (n_rows, n_out) = x weight^T + bias + (u * gates * scaling) expand[:, table]^T, and u.

    x/weight may be None (no base product). With shrink_proj (r, depth) the kernel computes u = shrink_input (x when
    None) . shrink_proj[expert] itself, in the GEMM's K loop, and returns it (add_rank=False: u only, y without the
    rank part); otherwise u is given (None: no rank part). weight: (n_out, depth) view, expand: (n_out, r) view."""
    y = torch.empty(n_rows, n_out, device=expand.device, dtype=dtype)
    has_base, shrink_here = x is not None, shrink_proj is not None
    depth = x.shape[1] if has_base else 0
    if shrink_here:
        assert has_base and routing.n_slots <= FUSED_SHRINK_MAX_SLOTS, "the fused shrink runs in the base's K loop"
        u = torch.empty(n_rows, routing.n_slots, device=expand.device, dtype=torch.float32)
    # Unused pointer arguments still need a tensor; `expand` stands in, and the constexpr flags skip every access.
    x_arg, w_arg = (x, weight) if has_base else (expand, expand)
    u_arg = u if u is not None else expand
    shrink_in_arg = shrink_input if shrink_input is not None else expand
    proj_arg = shrink_proj if shrink_here else expand
    # The in-loop shrink needs one group's slots per row tile; otherwise gather tiles run across samples.
    span_samples = routing.variant == "gather" and not shrink_here
    rows_per_group, n_groups = (n_rows, 1) if span_samples else (routing.rows_per_group, routing.n_groups)
    tiles = gemm_tiles(dtype, rows_per_group, n_out, depth)
    n_tiles_n = _cdiv(n_out, tiles.block_n)
    n_tiles_m = n_groups * _cdiv(rows_per_group, tiles.block_m)
    _fused_linear_kernel[(n_tiles_m * n_tiles_n,)](
        x_arg, x_arg.stride(0), x_arg.stride(1), w_arg, w_arg.stride(0), w_arg.stride(1),
        bias if bias is not None else expand, u_arg, u_arg.stride(0),
        shrink_in_arg, shrink_in_arg.stride(0), shrink_in_arg.stride(1),
        proj_arg, proj_arg.stride(0), proj_arg.stride(1),
        routing.gates, routing.gates.stride(0), routing.gates.stride(1),
        expand, expand.stride(0), expand.stride(1), routing.idx, routing.idx.stride(0), routing.idx.stride(1),
        y, y.stride(0), y.stride(1),
        rows_per_group, routing.tokens_per_sample, depth, n_out, routing.n_slots, routing.n_chosen, scaling,
        n_tiles_n,
        HAS_BASE=has_base, HAS_BIAS=bias is not None, HAS_LORA=u is not None and add_rank, SHRINK=shrink_here,
        SHRINK_OWN_INPUT=shrink_input is not None, SPAN_SAMPLES=span_samples, DENSE_SLOTS=routing.dense_slots,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        BLOCK_SLOTS=_block(routing.n_slots, FUSED_SHRINK_MAX_SLOTS), RANK_DOT=_RANK_DOT[dtype], **_dot_config(dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return y, (u if shrink_here else None)


# Outputs the kernels write whole. A name of its own so that a test can fill them with NaN: a row left unwritten shows.
_unwritten_like = torch.empty_like

# The mask variant's rows form one group; its dA / dB sums run over row chunks (at most _MASK_MAX_CHUNKS of at least
# _MASK_ROW_CHUNK rows) so that more programs share them, and the chunk partials are summed in a fixed order after.
_MASK_ROW_CHUNK = 128
_MASK_MAX_CHUNKS = 16


def _expert_grads(problems: list, routing: _Routing, scaling: float, n_experts: int) -> None:
    """For each (u, m, out) of one or two problems (the backward's dA and dB), out (r, n_cols, any strides) gets
    out[e, c] = sum over rows and slots choosing e of (u * gates * scaling)[row, slot] m[row, c]: one launch for the
    per-group partials of all problems, one for their per-expert sums."""
    n_rows = problems[0][1].shape[0]
    if routing.variant == "mask":
        rows_per_group = max(_MASK_ROW_CHUNK, _cdiv(n_rows, _MASK_MAX_CHUNKS))
        n_groups = _cdiv(n_rows, rows_per_group)
    else:
        rows_per_group, n_groups = routing.rows_per_group, routing.n_groups
    block_slots, block_c = _block(routing.n_slots, 32), _block(max(m.shape[1] for _, m, _ in problems), 64)
    partials = [torch.empty(n_groups, routing.n_slots, m.shape[1], device=m.device, dtype=torch.float32)
                for _, m, _ in problems]  # fmt: skip
    col_blocks = [_cdiv(m.shape[1], block_c) for _, m, _ in problems]
    (u_a, m_a, out_a), (u_b, m_b, out_b) = problems[0], problems[-1]  # one problem: b is a, never reached
    partial_a, partial_b = partials[0], partials[-1]
    _group_outer_kernel[(n_groups, _cdiv(routing.n_slots, block_slots), sum(col_blocks))](
        u_a, u_a.stride(0), m_a, m_a.stride(0), m_a.stride(1), partial_a, m_a.shape[1], col_blocks[0],
        u_b, u_b.stride(0), m_b, m_b.stride(0), m_b.stride(1), partial_b, m_b.shape[1], *routing.kernel_args(),
        rows_per_group, n_rows, routing.tokens_per_sample, routing.n_slots, routing.n_chosen, scaling,
        DENSE_SLOTS=routing.dense_slots, BLOCK_M=_block(rows_per_group, 32), BLOCK_SLOTS=block_slots, BLOCK_C=block_c,
        RANK_DOT=_RANK_DOT[m_a.dtype], UPCAST_DOT=_dot_config(m_a.dtype)["UPCAST_DOT"],
    )  # fmt: skip
    # The mask variant's pairs are (row chunk, expert); the gather variant's (sample, choice), expert idx[sample, j].
    table = routing.idx.reshape(-1).contiguous()  # read as a flat table (a no-op for routing's own idx)
    _scatter_slots_kernel[(n_experts, sum(col_blocks))](
        partial_a, out_a, out_a.stride(0), out_a.stride(1), m_a.shape[1], col_blocks[0],
        partial_b, out_b, out_b.stride(0), out_b.stride(1), m_b.shape[1],
        table, n_groups * routing.n_slots, routing.n_slots,
        DENSE_SLOTS=routing.dense_slots, BLOCK_P=16, BLOCK_C=block_c,
    )  # fmt: skip


def choose_variant(n_experts: int, k: int, tokens_per_sample: int) -> str:
    """The dispatcher between the variants, from shapes only (no device data, so graph- and capture-safe).

    Shrink-all + mask pays r / k times the gather's shrink and expand work, but its tiles span samples: it wins when
    r is small (<= 32), when most experts are chosen anyway (r <= 2k), or when samples are too short (< 16 tokens)
    to fill the gather's sample-aligned 16-row tiles."""
    if n_experts <= 32 or n_experts <= 2 * k or tokens_per_sample < 16:
        return "mask"
    return "gather"


# ---- registered ops ------------------------------------------------------------------------------------------------


# Each op's body is a plain function: the registered op (what torch.compile traces) and the eager autograd.Function
# (`_EagerPoolLinear`, which skips the dispatcher's overhead: rank1_kernels/_eager.py) both call it.


def _forward(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input, variant, shrink):
    """y (n_rows, d_out) and the ungated rank activations u (n_rows, k or r) in fp32, kept for backward."""
    (n_rows, d_in), d_out, n_experts = x.shape, weight.shape[0], A.shape[0]
    routing = _Routing(idx, gates, n_experts, n_rows, tokens_per_sample, variant)
    if n_rows == 0:
        return x.new_empty(0, d_out), x.new_empty(0, routing.n_slots, dtype=torch.float32)
    if routing.fuse_shrink(shrink, d_out, d_in, x.dtype):
        return _fused_linear(x, weight, bias, B, routing, scaling, n_rows, d_out, x.dtype, shrink_proj=A,
                             shrink_input=lora_input)  # fmt: skip
    u = _shrink(x if lora_input is None else lora_input, A, routing)
    y, _ = _fused_linear(x, weight, bias, B, routing, scaling, n_rows, d_out, x.dtype, u=u)
    return y, u


@torch.library.custom_op("rank1::triton_pool_linear_fwd", mutates_args=())
def triton_pool_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
    idx: torch.Tensor, gates: torch.Tensor, scaling: float, tokens_per_sample: int, lora_input: Optional[torch.Tensor],
    variant: str, shrink: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns y (n_rows, d_out) and the ungated rank activations u (n_rows, k or r) in fp32, kept for backward."""
    return _forward(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input, variant, shrink)


@triton_pool_linear_fwd.register_fake
def _(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input, variant, shrink):
    n_slots = idx.shape[1] if variant == "gather" else A.shape[0]
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], n_slots, dtype=torch.float32)


def _backward_kernels(grad_y, x, weight, A, B, idx, gates, scaling, tokens_per_sample, lora_input, u, variant, shrink,
                      need_x, need_lora_input, need_A, need_B, need_gates):  # fmt: skip
    """Gradients (dx, dlora_input, dA, dB, dgates); each one not asked for is an empty tensor. With lora_input None
    the rank path's input gradient is part of dx."""
    (n_rows, d_in), d_out, n_experts = x.shape, weight.shape[0], A.shape[0]
    routing = _Routing(idx, gates, n_experts, n_rows, tokens_per_sample, variant)
    # A registered op's outputs may not alias each other: one placeholder (or zero result) each. With rows, every
    # asked-for gradient is written whole below (dA/dB: every expert's row, zero if unchosen), so no memset first;
    # dx and d(lora_input) are the fused kernel's own outputs.
    fill = torch.zeros_like if n_rows == 0 else _unwritten_like
    grad_A, grad_B, grad_gates = (fill(like) if need else x.new_empty(0)
                                  for need, like in ((need_A, A), (need_B, B), (need_gates, gates)))  # fmt: skip
    # Row-major whatever x's layout (the fused kernel writes them so): the fake says the same.
    grad_x, grad_lora_input = (x.new_zeros(x.shape) if need and n_rows == 0 else x.new_empty(0)
                               for need in (need_x, need_lora_input))  # fmt: skip
    if n_rows == 0:
        return grad_x, grad_lora_input, grad_A, grad_B, grad_gates
    rank_input_grad_in_dx = lora_input is None and need_x
    need_grad_u = rank_input_grad_in_dx or need_lora_input or need_A or need_gates
    grad_u = None  # (dy B_S): fp32 (n_rows, n_slots), ungated
    if need_x and need_grad_u and routing.fuse_shrink(shrink, d_in, d_out, x.dtype):
        # dx's GEMM runs over dy's columns, the depth of dy B_S too: one launch computes both.
        grad_x, grad_u = _fused_linear(grad_y, weight.t(), None, A.t(), routing, scaling, n_rows, d_in, x.dtype,
                                       shrink_proj=B.t(), add_rank=rank_input_grad_in_dx)  # fmt: skip
    else:
        if need_grad_u:
            grad_u = _shrink(grad_y, B.t(), routing)
        if need_x:
            grad_x, _ = _fused_linear(grad_y, weight.t(), None, A.t(), routing, scaling, n_rows, d_in, x.dtype,
                                      u=grad_u if rank_input_grad_in_dx else None)  # fmt: skip
    if need_lora_input:
        grad_lora_input, _ = _fused_linear(None, None, None, A.t(), routing, scaling, n_rows, d_in, x.dtype, u=grad_u)
    # dA and dB together: two launches for both.
    expert_problems = ([(grad_u, x if lora_input is None else lora_input, grad_A)] if need_A else []) + (
        [(u, grad_y, grad_B.t())] if need_B else [])  # fmt: skip
    if expert_problems:
        _expert_grads(expert_problems, routing, scaling, n_experts)
    if need_gates:
        block_k = _block(routing.n_chosen, 64)
        _gate_grad_kernel[(idx.shape[0], _cdiv(routing.n_chosen, block_k))](
            u, u.stride(0), grad_u, grad_u.stride(0), idx, idx.stride(0), idx.stride(1), grad_gates,
            grad_gates.stride(0), grad_gates.stride(1), tokens_per_sample, routing.n_chosen, scaling,
            DENSE_SLOTS=routing.dense_slots, BLOCK_M=_block(tokens_per_sample, 64), BLOCK_K=block_k,
        )  # fmt: skip
    return grad_x, grad_lora_input, grad_A, grad_B, grad_gates


@torch.library.custom_op("rank1::triton_pool_linear_bwd", mutates_args=())
def triton_pool_linear_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor,
    gates: torch.Tensor, scaling: float, tokens_per_sample: int, lora_input: Optional[torch.Tensor], u: torch.Tensor,
    variant: str, shrink: str, need_x: bool, need_lora_input: bool, need_A: bool, need_B: bool, need_gates: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (dx, dlora_input, dA, dB, dgates); each one not asked for is an empty tensor. With lora_input None
    the rank path's input gradient is part of dx."""
    return _backward_kernels(grad_y, x, weight, A, B, idx, gates, scaling, tokens_per_sample, lora_input, u, variant,
                             shrink, need_x, need_lora_input, need_A, need_B, need_gates)  # fmt: skip


@triton_pool_linear_bwd.register_fake
def _(grad_y, x, weight, A, B, idx, gates, scaling, tokens_per_sample, lora_input, u, variant, shrink, need_x,
      need_lora_input, need_A, need_B, need_gates):  # fmt: skip
    def maybe(flag, like):
        return torch.empty_like(like) if flag else x.new_empty(0)

    def row_major(flag):  # dx and d(lora_input) are row-major whatever x's layout
        return x.new_empty(x.shape) if flag else x.new_empty(0)

    return row_major(need_x), row_major(need_lora_input), maybe(need_A, A), maybe(need_B, B), maybe(need_gates, gates)


def _setup_context(ctx, inputs, output):
    x, weight, _, A, B, idx, gates, scaling, tokens_per_sample, lora_input, variant, shrink = inputs
    ctx.save_for_backward(x, weight, A, B, idx, gates, lora_input, output[1])
    ctx.scaling, ctx.tokens_per_sample, ctx.variant, ctx.shrink = scaling, tokens_per_sample, variant, shrink
    ctx.has_lora_input = lora_input is not None


def _gradients(ctx, grad_y, backward_kernels):
    """The forward inputs' gradients (None where not needed), computed by `backward_kernels` (the registered
    backward op, or its body in eager mode)."""
    x, weight, A, B, idx, gates, lora_input, u = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if needs[1] or needs[2]:
        raise RuntimeError(frozen_base_message("Triton"))
    grads = backward_kernels(
        grad_y, x, weight, A, B, idx, gates, ctx.scaling, ctx.tokens_per_sample, lora_input, u, ctx.variant,
        ctx.shrink, needs[0], ctx.has_lora_input and needs[9], needs[3], needs[4], needs[6],
    )  # fmt: skip
    grad_x, grad_lora_input, grad_A, grad_B, grad_gates = (
        grad if need else None for grad, need in zip(grads, (needs[0], needs[9], needs[3], needs[4], needs[6]))
    )
    return grad_x, None, None, grad_A, grad_B, None, grad_gates, None, None, grad_lora_input, None, None


def _backward(ctx, grad_y, grad_u):
    return _gradients(ctx, grad_y, torch.ops.rank1.triton_pool_linear_bwd)


triton_pool_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


_EagerPoolLinear = eager_function("_EagerPoolLinear", _forward, _setup_context, _gradients, _backward_kernels)


# ---- functional ----------------------------------------------------------------------------------------------------


def triton_pool_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
    idx: torch.Tensor, gates: torch.Tensor, scaling: float, tokens_per_sample: int,
    lora_input: Optional[torch.Tensor] = None, variant: str = "auto", shrink: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """The pool linear through the Triton kernels; arguments as `rank1_pool_linear_ref` (inputs are assumed
    validated by `check_pool_linear_inputs`). variant: "auto" (`choose_variant`), "gather" or "mask". shrink:
    "auto" (`choose_shrink`, per GEMM launch), "fused" (inside the GEMM's K loop wherever the slots fit, at most
    FUSED_SHRINK_MAX_SLOTS) or "separate" (its own kernel). Returns y (n_rows, d_out) with autograd to x, A, B,
    gates and lora_input."""
    if variant == "auto":
        variant = choose_variant(A.shape[0], idx.shape[1], tokens_per_sample)
    elif variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported; expected 'auto', 'gather' or 'mask'")
    if shrink not in ("auto", *SHRINKS):
        raise ValueError(f"shrink={shrink!r} is not supported; expected 'auto', 'fused' or 'separate'")
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads it with unit stride (a no-op for a Linear's own bias)
    inputs = (x, weight, bias, A, B, idx, gates, float(scaling), tokens_per_sample, lora_input, variant, shrink)
    return call(torch.ops.rank1.triton_pool_linear_fwd, _EagerPoolLinear, inputs)


_INTERPRETED = type(_fused_linear_kernel).__name__ == "InterpretedFunction"


def is_interpreted() -> bool:
    """Whether these kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED
