"""Routing in Triton: the router's scores, the top-k choice and the activation-count update in one launch.

For gate="none" (the paper's router) a pool layer's training forward is then two launches, this and the fused
linear, where PyTorch takes four before it (router GEMM, sort, copy of the top k, count update): at ViT-B/16 shapes
each of those small launches costs about as much host time in eager mode as the fused linear itself, and GPU time
between graph-replayed kernels.

    scores = tokens @ router_weight^T + router_bias   accumulated in fp32, rounded to the input dtype
    idx    = the k best scores per sample, ties to the lowest index                                ("sample")
             the k experts most voted by the samples' own top k, ties to the lowest index, for all  ("batch")
    counts[e] += how many (sample, choice) pairs chose e                                           (counts given)

which is `rank1_kernels.routing.route_reference` (ranking on scores rounded as F.linear rounds them, so a tie there
is a tie here). The scores are never written out: nothing downstream of gate="none" needs them. The counts are
integers added atomically, so the order of the adds does not change the result. A NaN score ranks as +inf (torch's
sort puts NaN first): only reachable with the device-sync checks off, and never an index outside [0, r).
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import block as _block
from ._launch import cdiv as _cdiv
from .triton_pool_linear import _dot_config, _input_dot

# The scores of a block of samples over all experts live in registers while k of them are picked: above this many
# experts the tile would spill, and PyTorch's sort routes instead (Backend.refuse_reason says so).
MAX_EXPERTS = 1024
# tl.dot's smallest tile edge: a block of samples is at least this tall even for one sample.
_BLOCK_SAMPLES = 16


@functools.cache
def route_launch(n_experts: int, d_in: int) -> dict:
    """Tile edges and launch settings for r experts: the router-weight tile (BLOCK_D x BLOCK_E) kept at 8K elements,
    8 warps from 64 experts on. On sm_90 this compiles without register spills up to 1024 experts (bf16; fp32 "batch"
    spills a few bytes from 512) and within shared memory (tests/triton_aot.py checks up to 256)."""
    block_e = _block(n_experts, MAX_EXPERTS)
    return {"BLOCK_S": _BLOCK_SAMPLES, "BLOCK_E": block_e, "BLOCK_D": min(_block(d_in, 64), max(16, 8192 // block_e)),
            "num_warps": 4 if block_e < 64 else 8, "num_stages": 2}  # fmt: skip


@triton.jit
def _scores(tok_ptr, stride_tok_sample, stride_tok_d, w_ptr, stride_w_expert, stride_w_d, bias_ptr, samples,
            sample_ok, experts, expert_ok, d_in, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
            BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
            UPCAST_DOT: tl.constexpr):  # fmt: skip
    """(samples, experts) routing scores in fp32, rounded through the input dtype as the reference's F.linear rounds
    them; NaN as +inf."""
    acc = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
    for d0 in range(0, d_in, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d_in
        tokens = tl.load(tok_ptr + samples[:, None] * stride_tok_sample + ds[None, :] * stride_tok_d,
                         mask=sample_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        weights = tl.load(w_ptr + experts[None, :] * stride_w_expert + ds[:, None] * stride_w_d,
                          mask=d_ok[:, None] & expert_ok[None, :], other=0.0)  # fmt: skip
        acc = _input_dot(tokens, weights, acc, DOT_PRECISION, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)[None, :]
    scores = acc.to(tok_ptr.dtype.element_ty).to(tl.float32)
    return tl.where(scores != scores, float("inf"), scores)  # noqa: PLR0124 (x != x: the NaN test)


@triton.jit
def _take_best(values, taken, experts):
    """Per row, the best value not yet taken (ties to the lowest expert), and `taken` with it marked. Every row
    has an untaken expert left (k <= r), so the choice is always a real expert."""
    candidates = tl.where(taken, float("-inf"), values)
    best = tl.max(candidates, axis=1)
    tied = (candidates == best[:, None]) & ~taken
    chosen = tl.min(tl.where(tied, experts[None, :], 2**30), axis=1)
    return chosen, taken | (experts[None, :] == chosen[:, None])


@triton.jit
def _route_kernel(
    tok_ptr, stride_tok_sample, stride_tok_d, w_ptr, stride_w_expert, stride_w_d, bias_ptr, idx_ptr, counts_ptr,
    n_samples, n_experts, d_in, k,
    HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, BATCH: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Mode "sample": one program per block of samples, each writing its samples' k choices. Mode "batch": one
    program for the whole batch (the vote needs every sample), looping over sample blocks."""
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < n_experts
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
                chosen, taken = _take_best(scores, taken, experts)
                hit = (experts[None, :] == chosen[:, None]) & sample_ok[:, None]
                votes += tl.sum(hit.to(tl.int32), axis=0)
        # The vote's own top k (a one-row problem), written to every sample; each chosen expert counted per sample.
        vote_rows = votes[None, :].to(tl.float32)  # exact: at most n_samples * k votes
        vote_taken = (experts >= n_experts)[None, :]
        for j in range(k):
            chosen, vote_taken = _take_best(vote_rows, vote_taken, experts)
            expert = tl.sum(chosen, axis=0).to(tl.int64)  # the one row's choice, as a scalar
            for s0 in range(0, n_samples, BLOCK_S):
                samples = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
                tl.store(idx_ptr + samples * k + j, tl.zeros((BLOCK_S,), dtype=tl.int64) + expert,
                         mask=samples < n_samples)  # fmt: skip
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
        for j in range(k):
            chosen, taken = _take_best(scores, taken, experts)
            tl.store(idx_ptr + samples * k + j, chosen.to(tl.int64), mask=sample_ok)
            if COUNT:
                tl.atomic_add(counts_ptr + chosen, tl.full((BLOCK_S,), 1, tl.int64), mask=sample_ok)


def _route(tokens, router_weight, router_bias, k, batch, counts):
    """idx (n_samples, k) int64; counts (r,) int64 or None gets the choices added in place."""
    n_samples, d_in = tokens.shape
    n_experts = router_weight.shape[0]
    idx = torch.empty(n_samples, k, device=tokens.device, dtype=torch.int64)
    if n_samples == 0:
        return idx
    grid = (1,) if batch else (_cdiv(n_samples, _BLOCK_SAMPLES),)
    _route_kernel[grid](
        tokens, tokens.stride(0), tokens.stride(1), router_weight, router_weight.stride(0), router_weight.stride(1),
        router_bias if router_bias is not None else router_weight, idx, counts if counts is not None else idx,
        n_samples, n_experts, d_in, k,
        HAS_BIAS=router_bias is not None, COUNT=counts is not None, BATCH=batch, **route_launch(n_experts, d_in),
        **_dot_config(tokens.dtype),
    )  # fmt: skip
    return idx


@torch.library.custom_op("rank1::triton_route", mutates_args=("counts",))
def triton_route_op(
    tokens: torch.Tensor, router_weight: torch.Tensor, router_bias: Optional[torch.Tensor], k: int, batch: bool,
    counts: Optional[torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """idx (n_samples, k) int64 of the gate-"none" routing; counts, when given, gets the choices added in place."""
    return _route(tokens, router_weight, router_bias, k, batch, counts)


@triton_route_op.register_fake
def _(tokens, router_weight, router_bias, k, batch, counts):
    return tokens.new_empty(tokens.shape[0], k, dtype=torch.int64)


def triton_route(
    tokens: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, k: int, mode: str,
    counts: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """Routing for gate="none" in one launch; arguments as `rank1_kernels.routing.route_reference` (validated there).
    Nothing here carries gradient, so eager mode calls the body directly (no dispatcher, no autograd node) and
    torch.compile traces the registered op."""
    if torch.compiler.is_compiling():
        return torch.ops.rank1.triton_route(tokens, router_weight, router_bias, k, mode == "batch", counts)
    return _route(tokens, router_weight, router_bias, k, mode == "batch", counts)
