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

from ._checks import GATE_KINDS, ROUTING_MODES, check_choice, check_finite_scores, check_last_dim, check_same_device_dtype, check_top_k


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


def route(
    tokens: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    k: int,
    mode: str = "sample",
    gate: str = "none",
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select k experts per sample.

    tokens: (n_samples, d_in) routing tokens; router_weight: (r, d_in); router_bias: (r,) or None.
    Returns idx (n_samples, k) int64 and gates (n_samples, k) in tokens.dtype; gates carry gradient to
    the router for gate="softmax"/"sigmoid" and are constant ones for gate="none" (a read-only expanded view).
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

    scores = F.linear(tokens, router_weight, router_bias)
    if check_finite:
        check_finite_scores(scores)
    # Rank in fp32 so that half-precision rounding does not create ties the fp32 scores do not have.
    per_sample = top_experts(scores.detach().to(torch.promote_types(scores.dtype, torch.float32)), k)
    if mode == "sample":
        idx = per_sample
    else:
        votes = torch.zeros(n_experts, dtype=torch.int64, device=tokens.device)
        votes.scatter_add_(0, per_sample.reshape(-1), torch.ones_like(per_sample.reshape(-1)))
        idx = top_experts(votes, k).unsqueeze(0).expand(tokens.shape[0], k).contiguous()

    if gate == "none":
        gates = shared_ones(idx.shape, tokens.dtype, tokens.device)
    else:
        chosen = scores.gather(1, idx)
        # Softmax over the chosen k equals the full softmax renormalised over them.
        if gate == "softmax":
            at_least_fp32 = torch.promote_types(chosen.dtype, torch.float32)
            gates = torch.softmax(chosen.to(at_least_fp32), dim=-1).to(tokens.dtype)
        else:
            gates = torch.sigmoid(chosen)
    return idx, gates
