"""Routing: each sample picks k of the r rank-1 experts from its routing token.

    scores = tokens @ router_weight^T + router_bias          (n_samples, r)
    idx    = the k best experts per sample ("sample"), or the k experts most voted
             by the per-sample top-k across the batch, shared by every sample ("batch")
    gates  = 1 ("none"), softmax of the chosen scores ("softmax"), sigmoid of them ("sigmoid")

Ties are broken by the lowest expert index, deterministically (a stable descending sort).
The paper's released code is routing="batch", gate="none": its router receives no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import (
    GATE_KINDS,
    ROUTING_MODES,
    check_choice,
    check_counts,
    check_finite_scores,
    check_last_dim,
    check_same_device_dtype,
    check_top_k,
)
from .backends import resolve_backend


def top_experts(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim, ties to the lowest index. int64, same leading shape,
    contiguous (one copy here saves one in every consumer that flattens it: activation counts, dA/dB scatters)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k].contiguous()


# One-element tensors of ones per (dtype, device), expanded to any shape: constant gates and count increments
# without a fill launch per layer and step. Expanded (stride 0), so an in-place write to one raises.
_ONES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def shared_ones(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.ones(shape) as a read-only expanded view of a cached one-element tensor."""
    if torch.compiler.is_compiling():  # traced: the compiler folds a fill into its kernels
        return torch.ones(shape, dtype=dtype, device=device)
    key = (dtype, torch.device(device))
    one = _ONES.get(key)
    if one is None:
        if key[1].type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Captured, the fill would run only on replay: the cache would hold garbage until then.
            return torch.ones(shape, dtype=dtype, device=device)
        with torch.inference_mode(False):  # a normal tensor even when first asked for under inference_mode
            one = _ONES[key] = torch.ones(1, dtype=dtype, device=device)
    return one.expand(shape)


def _select(scores: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """idx (n_samples, k) from the (n_samples, r) scores: each sample's top k, or the batch's vote over them."""
    # Rank in fp32 so that half-precision rounding does not create ties the fp32 scores do not have.
    per_sample = top_experts(scores.detach().to(torch.promote_types(scores.dtype, torch.float32)), k)
    if mode == "sample":
        return per_sample
    votes = torch.zeros(scores.shape[1], dtype=torch.int64, device=scores.device)
    votes.scatter_add_(0, per_sample.reshape(-1), torch.ones_like(per_sample.reshape(-1)))
    return top_experts(votes, k).unsqueeze(0).expand(scores.shape[0], k).contiguous()


def _count(counts: torch.Tensor | None, idx: torch.Tensor) -> None:
    """counts[e] += how many (sample, choice) pairs of idx chose e. Integer counts: autograd records nothing."""
    if counts is not None:
        flat = idx.reshape(-1)
        counts.index_add_(0, flat, shared_ones(flat.shape, flat.dtype, flat.device))


def route_reference(
    tokens: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    k: int,
    mode: str = "sample",
    counts: torch.Tensor | None = None,
    check_finite: bool = True,
    gate: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing in PyTorch, the oracle of the backends' fused routing (`Backend.route`): idx (n_samples, k) int64 and
    gates (n_samples, k); counts (r,) int64, when given, gets the choices added in place. Inputs validated by
    `route`."""
    scores = F.linear(tokens, router_weight, router_bias)
    if check_finite:
        check_finite_scores(scores)
    idx = _select(scores, k, mode)
    _count(counts, idx)
    if gate == "none":
        return idx, shared_ones(idx.shape, tokens.dtype, tokens.device)
    chosen_scores = scores.gather(1, idx)
    # Softmax over the chosen k equals the full softmax renormalised over them.
    if gate == "softmax":
        at_least_fp32 = torch.promote_types(chosen_scores.dtype, torch.float32)
        return idx, torch.softmax(chosen_scores.to(at_least_fp32), dim=-1).to(tokens.dtype)
    return idx, torch.sigmoid(chosen_scores)


def route(
    tokens: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    k: int,
    mode: str = "sample",
    gate: str = "none",
    check_finite: bool = True,
    counts: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select k experts per sample.

    tokens: (n_samples, d_in) routing tokens; router_weight: (r, d_in); router_bias: (r,) or None.
    Returns idx (n_samples, k) int64 and gates (n_samples, k) in tokens.dtype; gates carry gradient to
    the router for gate="softmax"/"sigmoid" and are constant ones for gate="none" (a read-only expanded view).
    counts (r,) int64, when given, gets the choices added in place (a layer's activation counts in training).
    The backend's fused routing runs where it has one (Triton: scores, choice, gates and counts in one launch); a
    backend without one, or that refuses these inputs, routes in PyTorch (`route_reference`).
    """
    check_choice("mode", mode, ROUTING_MODES)
    check_choice("gate", gate, GATE_KINDS)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be 2-D (n_samples, d_in), got shape {tuple(tokens.shape)}")
    if router_weight.dim() != 2:
        raise ValueError(f"router_weight must be 2-D (r, d_in), got shape {tuple(router_weight.shape)}")
    n_experts = router_weight.shape[0]
    check_top_k(k, n_experts)
    check_last_dim("tokens", tokens, router_weight.shape[1], "the router's input features")
    check_same_device_dtype("tokens", tokens, router_weight=router_weight, router_bias=router_bias)
    if counts is not None:
        check_counts(counts, n_experts, tokens.device)
    tensors = [t for t in (tokens, router_weight, router_bias) if t is not None]
    chosen = resolve_backend(backend, "route", tensors)
    return chosen.route(tokens, router_weight, router_bias, k, mode, counts, check_finite, gate)
