"""Routing in Triton: the router's scores, the top-k choice, the gates and the activation-count update in one launch.

A pool layer's training forward is then two launches, this and the fused linear, where PyTorch takes four before it
(router GEMM, sort, copy of the top k, count update; learned gates add a gather, the softmax or sigmoid and casts):
at ViT-B/16 shapes each of those small launches costs about as much host time in eager mode as the fused linear
itself, and GPU time between graph-replayed kernels.

    scores = tokens @ router_weight^T + router_bias   accumulated in fp32, rounded to the input dtype
    idx    = the k best scores per sample, ties to the lowest index                                ("sample")
             the k experts most voted by the samples' own top k, ties to the lowest index, for all  ("batch")
    gates  = softmax over the sample's k chosen scores (fp32), or their sigmoid; none for gate="none"
    counts[e] += how many (sample, choice) pairs chose e                                           (counts given)

which is `rank1_kernels.routing.route_reference` (ranking on scores rounded as F.linear rounds them, so a tie there
is a tie here). The scores are never written out. Learned gates get their gradient to the router from
`_RouterGradient`: one more launch in the backward (`_router_grad_kernel`, from the fp32 gates), in place of a dozen
small torch ops. The counts are integers added atomically, so the order of the adds does not change the result. A
NaN score ranks as +inf (torch's sort puts NaN first): only reachable with the device-sync checks off, and never an
index outside [0, r).
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import block as _block
from ._launch import cdiv as _cdiv
from .triton_pool_linear import _dot_config, _input_dot, _to

# The scores of a block of samples over all experts live in registers while k of them are picked: above this many
# experts the tile would spill, and PyTorch's sort routes instead (Backend.refuse_reason says so).
MAX_EXPERTS = 1024
# tl.dot's smallest tile edge: a block of samples is at least this tall even for one sample.
_BLOCK_SAMPLES = 16


@functools.cache
def route_launch(n_experts: int, d_in: int) -> dict:
    """Tile edges and launch settings for r experts: the router-weight tile (BLOCK_D x BLOCK_E) at most 2K elements
    from 32 experts on, and more warps as the pool grows. On sm_90, triton 3.6 and 3.8, every dtype, mode and gate,
    this spills at most a few words of registers up to 256 experts (tests/triton_aot.py checks it); beyond, "batch"
    spills a few hundred bytes at most."""
    block_e = _block(n_experts, MAX_EXPERTS)
    return {"BLOCK_S": _BLOCK_SAMPLES, "BLOCK_E": block_e, "BLOCK_D": min(_block(d_in, 64), max(16, 2048 // block_e)),
            "num_warps": 4 if block_e < 64 else 8 if block_e < 128 else 16, "num_stages": 2}  # fmt: skip


@triton.jit
def _scores(tok_ptr, stride_tok_sample, stride_tok_d, w_ptr, stride_w_expert, stride_w_d, bias_ptr, samples,
            sample_ok, experts, expert_ok, d_in, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
            BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
            UPCAST_DOT: tl.constexpr):  # fmt: skip
    """(samples, experts) routing scores in fp32, rounded through the input dtype as the reference's F.linear rounds
    them; NaN as +inf."""
    acc = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, d_in, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)  # column-major tokens: d * n_samples may pass 2^31
        d_ok = ds < d_in
        tokens = tl.load(tok_ptr + samples[:, None] * stride_tok_sample + ds[None, :] * stride_tok_d,
                         mask=sample_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        weights = tl.load(w_ptr + experts[None, :] * stride_w_expert + ds[:, None] * stride_w_d,
                          mask=d_ok[:, None] & expert_ok[None, :], other=0.0)  # fmt: skip
        acc = _input_dot(tokens, weights, acc, DOT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    scores = _to(acc, tok_ptr.dtype.element_ty).to(tl.float32)
    return tl.where(scores != scores, float("inf"), scores)  # noqa: PLR0124 (x != x: the NaN test)


@triton.jit
def _take_best(values, taken, experts):
    """Per row, the best value not yet taken (ties to the lowest expert), that value, and `taken` with it marked.
    Every row has an untaken expert left (k <= r), so the choice is always a real expert."""
    candidates = tl.where(taken, float("-inf"), values)
    best = tl.max(candidates, axis=1)
    tied = (candidates == best[:, None]) & ~taken
    chosen = tl.min(tl.where(tied, experts[None, :], 2**30), axis=1)
    return chosen, best, taken | (experts[None, :] == chosen[:, None])


@triton.jit
def _store_gates(chosen_scores, gate_ptr, gate32_ptr, samples, sample_ok, slots, k, GATE: tl.constexpr):
    """Gates of a (samples, slots) tile of chosen scores: softmax over the k chosen (GATE 1) or sigmoid (GATE 2), in
    fp32, stored in fp32 (kept for the router's gradient) and in the input dtype (what the pool linear reads)."""
    slot_ok = slots < k
    if GATE == 1:
        chosen_scores = tl.where(slot_ok[None, :], chosen_scores, float("-inf"))
        exps = tl.exp(chosen_scores - tl.max(chosen_scores, axis=1)[:, None])
        gates = exps / tl.sum(exps, axis=1)[:, None]
    else:
        gates = tl.sigmoid(chosen_scores)
    offsets = samples[:, None] * k + slots[None, :]
    tile_ok = sample_ok[:, None] & slot_ok[None, :]
    tl.store(gate32_ptr + offsets, gates, mask=tile_ok)
    tl.store(gate_ptr + offsets, _to(gates, gate_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _route_kernel(
    tok_ptr, stride_tok_sample, stride_tok_d, w_ptr, stride_w_expert, stride_w_d, bias_ptr, idx_ptr, counts_ptr,
    gate_ptr, gate32_ptr, n_samples, n_experts, d_in, k,
    HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, BATCH: tl.constexpr, GATE: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Mode "sample": one program per block of samples, each writing its samples' k choices (and gates). Mode
    "batch": one program for the whole batch (the vote needs every sample), looping over sample blocks. GATE: 0
    none (no gates written), 1 softmax, 2 sigmoid."""
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < n_experts
    slots = tl.arange(0, BLOCK_K)
    if BATCH:
        votes = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for s0 in range(0, n_samples, BLOCK_S):
            samples = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
            sample_ok = samples < n_samples
            scores = _scores(tok_ptr, stride_tok_sample, stride_tok_d, w_ptr, stride_w_expert, stride_w_d, bias_ptr,
                             samples, sample_ok, experts, expert_ok, d_in, HAS_BIAS, BLOCK_S, BLOCK_E, BLOCK_D,
                             DOT_PRECISION, UPCAST_DOT)  # fmt: skip
            taken = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.int1) | (experts[None, :] >= n_experts)
            for _ in range(k):
                chosen, _, taken = _take_best(scores, taken, experts)
                hit = (experts[None, :] == chosen[:, None]) & sample_ok[:, None]
                votes += tl.sum(hit.to(tl.int32), axis=0)
        # The vote's own top k (a one-row problem), the same for every sample.
        vote_rows = votes[None, :].to(tl.float32)  # exact: at most n_samples * k votes
        vote_taken = (experts >= n_experts)[None, :]
        choice = tl.zeros((BLOCK_K,), dtype=tl.int64)
        for j in range(k):
            chosen, _, vote_taken = _take_best(vote_rows, vote_taken, experts)
            choice = tl.where(slots == j, tl.sum(chosen, axis=0).to(tl.int64), choice)
        for s0 in range(0, n_samples, BLOCK_S):
            samples = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
            sample_ok = samples < n_samples
            tl.store(idx_ptr + samples[:, None] * k + slots[None, :], tl.zeros((BLOCK_S, BLOCK_K), tl.int64) +
                     choice[None, :], mask=sample_ok[:, None] & (slots < k)[None, :])  # fmt: skip
            if GATE != 0:  # each sample's own scores at the shared experts: scored again (not kept from the vote)
                scores = _scores(tok_ptr, stride_tok_sample, stride_tok_d, w_ptr, stride_w_expert, stride_w_d,
                                 bias_ptr, samples, sample_ok, experts, expert_ok, d_in, HAS_BIAS, BLOCK_S, BLOCK_E,
                                 BLOCK_D, DOT_PRECISION, UPCAST_DOT)  # fmt: skip
                chosen_scores = tl.zeros((BLOCK_S, BLOCK_K), dtype=tl.float32)
                for j in range(k):
                    expert = tl.sum(tl.where(slots == j, choice, 0), axis=0)
                    column = tl.sum(tl.where(experts[None, :] == expert, scores, 0.0), axis=1)
                    chosen_scores = tl.where(slots[None, :] == j, column[:, None], chosen_scores)
                _store_gates(chosen_scores, gate_ptr, gate32_ptr, samples, sample_ok, slots, k, GATE)
        if COUNT:  # one program: a plain read-modify-write, each chosen expert once per sample
            picked = tl.sum(vote_taken.to(tl.int32), axis=0) > 0
            counts = tl.load(counts_ptr + experts, mask=expert_ok, other=0)
            tl.store(counts_ptr + experts, counts + tl.where(picked, n_samples, 0).to(tl.int64), mask=expert_ok)
    else:
        samples = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
        sample_ok = samples < n_samples
        scores = _scores(tok_ptr, stride_tok_sample, stride_tok_d, w_ptr, stride_w_expert, stride_w_d, bias_ptr,
                         samples, sample_ok, experts, expert_ok, d_in, HAS_BIAS, BLOCK_S, BLOCK_E, BLOCK_D,
                         DOT_PRECISION, UPCAST_DOT)  # fmt: skip
        taken = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.int1) | (experts[None, :] >= n_experts)
        chosen_scores = tl.zeros((BLOCK_S, BLOCK_K), dtype=tl.float32)
        for j in range(k):
            chosen, best, taken = _take_best(scores, taken, experts)
            tl.store(idx_ptr + samples * k + j, chosen.to(tl.int64), mask=sample_ok)
            if COUNT:
                tl.atomic_add(counts_ptr + chosen, tl.full((BLOCK_S,), 1, tl.int64), mask=sample_ok)
            if GATE != 0:
                chosen_scores = tl.where(slots[None, :] == j, best[:, None], chosen_scores)
        if GATE != 0:
            _store_gates(chosen_scores, gate_ptr, gate32_ptr, samples, sample_ok, slots, k, GATE)


@triton.jit
def _router_grad_kernel(
    grad_gate_ptr, stride_grad_sample, stride_grad_slot, gate32_ptr, idx_ptr, tok_ptr, stride_tok_sample,
    stride_tok_d, w_ptr, stride_w_expert, stride_w_d, grad_tok_ptr, grad_w_ptr, grad_bias_ptr, n_samples, n_experts,
    d_in, k,
    GATE: tl.constexpr, NEED_TOKENS: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The router's gradient through learned gates (see `_RouterGradient`), in fp32 with fp32 products. One program
    per block of BLOCK_D input columns walks every sample block in order: it owns its columns of d_tokens and d_W
    (no atomics, so the sums are the same run to run), and program 0 also sums d_bias. The scores' gradient is small
    ((samples, r)) and each program computes it again rather than reading it from another launch."""
    ds = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d_in
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < n_experts
    slots = tl.arange(0, BLOCK_K)
    slot_ok = slots < k
    if NEED_TOKENS:
        weights = tl.load(w_ptr + experts[:, None] * stride_w_expert + ds[None, :] * stride_w_d,
                          mask=expert_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    grad_w = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for s0 in range(0, n_samples, BLOCK_S):
        samples = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
        sample_ok = samples < n_samples
        tile_ok = sample_ok[:, None] & slot_ok[None, :]
        gates = tl.load(gate32_ptr + samples[:, None] * k + slots[None, :], mask=tile_ok, other=0.0)
        grad_gates = tl.load(grad_gate_ptr + samples[:, None] * stride_grad_sample + slots[None, :] * stride_grad_slot,
                             mask=tile_ok, other=0.0).to(tl.float32)  # fmt: skip
        if GATE == 1:  # softmax over the chosen: g (dg - sum_j dg_j g_j)
            grad_chosen = gates * (grad_gates - tl.sum(grad_gates * gates, axis=1)[:, None])
        else:  # sigmoid: dg g (1 - g)
            grad_chosen = grad_gates * gates * (1.0 - gates)
        chosen = tl.load(idx_ptr + samples[:, None] * k + slots[None, :], mask=tile_ok, other=-1)
        # Scatter to the chosen experts. A sample's k experts are distinct, so each score gets at most one term.
        grad_scores = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
        for j in range(k):
            in_slot = slots[None, :] == j
            expert = tl.sum(tl.where(in_slot, chosen, 0), axis=1)
            value = tl.sum(tl.where(in_slot, grad_chosen, 0.0), axis=1)
            grad_scores += tl.where((experts[None, :] == expert[:, None]) & sample_ok[:, None], value[:, None], 0.0)
        if NEED_TOKENS:
            grad_tokens = tl.dot(grad_scores, weights, input_precision="ieee")
            out_ok = sample_ok[:, None] & d_ok[None, :]
            tl.store(grad_tok_ptr + samples[:, None] * d_in + ds[None, :],
                     _to(grad_tokens, grad_tok_ptr.dtype.element_ty), mask=out_ok)  # fmt: skip
        if NEED_WEIGHT:
            tokens = tl.load(tok_ptr + samples[:, None] * stride_tok_sample + ds[None, :] * stride_tok_d,
                             mask=sample_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
            grad_w = tl.dot(tl.trans(grad_scores), tokens, grad_w, input_precision="ieee")
        if NEED_BIAS:
            grad_bias += tl.sum(grad_scores, axis=0)
    if NEED_WEIGHT:
        tl.store(grad_w_ptr + experts[:, None] * d_in + ds[None, :], _to(grad_w, grad_w_ptr.dtype.element_ty),
                 mask=expert_ok[:, None] & d_ok[None, :])  # fmt: skip
    if NEED_BIAS:
        tl.store(grad_bias_ptr + experts, _to(grad_bias, grad_bias_ptr.dtype.element_ty),
                 mask=expert_ok & (tl.program_id(0) == 0))  # fmt: skip


GATE_CODES = {"none": 0, "softmax": 1, "sigmoid": 2}


def _route(tokens, router_weight, router_bias, k, batch, gate, counts):
    """idx (n_samples, k) int64, and for a learned gate its gates in the input dtype and in fp32 (None, None for
    gate="none": no allocation); counts (r,) int64 or None gets the choices added in place."""
    n_samples, d_in = tokens.shape
    n_experts = router_weight.shape[0]
    # The kernel reads the bias and adds to the counts with unit stride: a strided view (a no-op for a Linear's own
    # bias and the layer's counts buffer) is copied, and the counts copied back.
    router_bias = router_bias.contiguous() if router_bias is not None else None
    counts_given, counts = counts, counts.contiguous() if counts is not None else None
    idx = torch.empty(n_samples, k, device=tokens.device, dtype=torch.int64)
    gates = gates32 = None
    if gate != "none":
        gates = torch.empty(n_samples, k, device=tokens.device, dtype=tokens.dtype)
        gates32 = torch.empty(n_samples, k, device=tokens.device, dtype=torch.float32)
    if n_samples == 0:
        return idx, gates, gates32
    grid = (1,) if batch else (_cdiv(n_samples, _BLOCK_SAMPLES),)
    # Unused pointer arguments still need a tensor; idx stands in, and the constexpr flags skip every access.
    _route_kernel[grid](
        tokens, tokens.stride(0), tokens.stride(1), router_weight, router_weight.stride(0), router_weight.stride(1),
        router_bias if router_bias is not None else router_weight, idx, counts if counts is not None else idx,
        gates if gates is not None else idx, gates32 if gates32 is not None else idx, n_samples, n_experts, d_in, k,
        HAS_BIAS=router_bias is not None, COUNT=counts is not None, BATCH=batch, GATE=GATE_CODES[gate],
        BLOCK_K=_slots_block(k), **route_launch(n_experts, d_in), **_dot_config(tokens.dtype),
    )  # fmt: skip
    if counts is not counts_given:
        counts_given.copy_(counts)
    return idx, gates, gates32


def _slots_block(k: int) -> int:
    """A power of two >= k: the tile of one sample's k chosen scores."""
    return 1 << (k - 1).bit_length()


@torch.library.custom_op("rank1::triton_route", mutates_args=("counts",))
def triton_route_op(
    tokens: torch.Tensor, router_weight: torch.Tensor, router_bias: Optional[torch.Tensor], k: int, batch: bool,
    gate: str, counts: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """idx (n_samples, k) int64, and for a learned gate its gates in the input dtype and in fp32 (else empty);
    counts, when given, gets the choices added in place. No autograd: `_RouterGradient` gives the gates theirs."""
    idx, gates, gates32 = _route(tokens, router_weight, router_bias, k, batch, gate, counts)
    if gates is None:  # an op's outputs are tensors, and may not alias each other
        gates, gates32 = tokens.new_empty(0), tokens.new_empty(0, dtype=torch.float32)
    return idx, gates, gates32


@triton_route_op.register_fake
def _(tokens, router_weight, router_bias, k, batch, gate, counts):
    gate_shape = (tokens.shape[0], k) if gate != "none" else (0,)
    return (tokens.new_empty(tokens.shape[0], k, dtype=torch.int64), tokens.new_empty(gate_shape),
            tokens.new_empty(gate_shape, dtype=torch.float32))  # fmt: skip


def _router_grad(grad_gates, gates32, idx, tokens, router_weight, gate, need_tokens, need_weight, need_bias):
    """The router's gradient through learned gates in one launch: d_tokens (n_samples, d_in) in the tokens' dtype,
    d_W (r, d_in) and d_bias (r,) in the router weight's dtype; None for each one not needed."""
    n_samples, d_in = tokens.shape
    n_experts = router_weight.shape[0]
    device, weight_dtype = tokens.device, router_weight.dtype
    grad_tokens = torch.empty(n_samples, d_in, device=device, dtype=tokens.dtype) if need_tokens else None
    grad_weight = torch.empty(n_experts, d_in, device=device, dtype=weight_dtype) if need_weight else None
    grad_bias = torch.empty(n_experts, device=device, dtype=weight_dtype) if need_bias else None
    launch = route_launch(n_experts, d_in)
    # Unused pointer arguments still need a tensor; idx stands in, and the constexpr flags skip every access.
    _router_grad_kernel[(max(1, _cdiv(d_in, launch["BLOCK_D"])),)](
        grad_gates, grad_gates.stride(0), grad_gates.stride(1), gates32, idx, tokens, tokens.stride(0),
        tokens.stride(1), router_weight, router_weight.stride(0), router_weight.stride(1),
        grad_tokens if need_tokens else idx, grad_weight if need_weight else idx, grad_bias if need_bias else idx,
        n_samples, n_experts, d_in, idx.shape[1],
        GATE=GATE_CODES[gate], NEED_TOKENS=need_tokens, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias,
        BLOCK_K=_slots_block(idx.shape[1]), **launch,
    )  # fmt: skip
    return grad_tokens, grad_weight, grad_bias


@torch.library.custom_op("rank1::triton_route_grad", mutates_args=())
def triton_route_grad_op(
    grad_gates: torch.Tensor, gates32: torch.Tensor, idx: torch.Tensor, tokens: torch.Tensor,
    router_weight: torch.Tensor, gate: str, need_tokens: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """`_router_grad` as an op for torch.compile: each gradient not needed comes back empty."""
    grads = _router_grad(grad_gates, gates32, idx, tokens, router_weight, gate, need_tokens, need_weight, need_bias)
    return tuple(grad if grad is not None else tokens.new_empty(0) for grad in grads)


@triton_route_grad_op.register_fake
def _(grad_gates, gates32, idx, tokens, router_weight, gate, need_tokens, need_weight, need_bias):
    n_experts, weight_dtype = router_weight.shape[0], router_weight.dtype
    return (tokens.new_empty(tokens.shape if need_tokens else (0,)),
            tokens.new_empty((n_experts, tokens.shape[1]) if need_weight else (0,), dtype=weight_dtype),
            tokens.new_empty((n_experts,) if need_bias else (0,), dtype=weight_dtype))  # fmt: skip


class _RouterGradient(torch.autograd.Function):
    """Gives the kernel's gates their gradient to the router: identity forward, and backward

        d_chosen = g (dg - sum_j dg g)  (softmax)  or  dg g (1 - g)  (sigmoid)      g: the fp32 gates
        d_scores = d_chosen scattered to the chosen experts                         (n_samples, r)
        d_tokens = d_scores W,  d_W = d_scores^T tokens,  d_bias = sum over samples of d_scores

    in fp32 (the reference's autograd runs them in the input dtype), rounded once into each input's dtype: one
    launch of `_router_grad_kernel`."""

    @staticmethod
    def forward(ctx, gates, gates32, idx, tokens, router_weight, router_bias, gate):
        ctx.save_for_backward(gates32, idx, tokens, router_weight)
        ctx.gate, ctx.has_bias = gate, router_bias is not None
        return gates

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_gates):
        gates32, idx, tokens, router_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need = (needs[3], needs[4], ctx.has_bias and needs[5])
        if torch.compiler.is_compiling():
            grads = torch.ops.rank1.triton_route_grad(grad_gates, gates32, idx, tokens, router_weight, ctx.gate, *need)
            grads = tuple(grad if needed else None for grad, needed in zip(grads, need))
        else:
            grads = _router_grad(grad_gates, gates32, idx, tokens, router_weight, ctx.gate, *need)
        return None, None, None, *grads, None


def triton_route(
    tokens: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, k: int, mode: str,
    counts: torch.Tensor | None, gate: str = "none",
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Routing in one launch; arguments as `rank1_kernels.routing.route` (validated there). Returns idx and, for a
    learned gate, the gates (with their gradient to tokens and router); None for gate="none". Eager mode calls the
    kernel's host code directly (no dispatcher) and torch.compile traces the registered op."""
    batch = mode == "batch"
    if torch.compiler.is_compiling():
        # Detached: the op has no autograd formula; the gates get theirs from _RouterGradient below.
        bias = router_bias.detach() if router_bias is not None else None
        idx, gates, gates32 = torch.ops.rank1.triton_route(tokens.detach(), router_weight.detach(), bias, k, batch,
                                                           gate, counts)  # fmt: skip
    else:
        idx, gates, gates32 = _route(tokens, router_weight, router_bias, k, batch, gate, counts)
    if gate == "none":
        return idx, None
    differentiable = (tokens, router_weight) + ((router_bias,) if router_bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
        gates = _RouterGradient.apply(gates, gates32, idx, tokens, router_weight, router_bias, gate)
    return idx, gates
