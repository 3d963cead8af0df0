"""The alternatives our layer is measured against, each computing what it computes in the usual way.

    DenseLoRALinear      plain LoRA in PyTorch:  x W^T + b + s (x A^T) B^T  (all r experts, no router)
    make_peft_lora       peft's lora.Linear around the same nn.Linear, same r and scaling
    OfficialPoolLinear   the paper's released code: route to a batch-shared expert set S, materialise
                         Delta W = s B[:, S] A[S, :] every step, then a second full GEMM x Delta W^T
    ago_loss_loop        the AGO loss as a Python loop over layers (one small GEMM chain per layer)

They take their weights from a FusedRank1PoolLinear (or an nn.Linear) so that every method in a comparison
holds the same numbers.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rank1_kernels import FusedRank1PoolLinear, route


def _frozen_copy(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor.detach().clone(), requires_grad=False)


class DenseLoRALinear(nn.Module):
    """x W^T + b + scaling (x A^T) B^T with W, b frozen; A (r, in_features), B (out_features, r) train.
    Accepts any leading shape (..., in_features)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scaling: float,
        dropout: float = 0.0,
    ):  # fmt: skip
        super().__init__()
        if A.shape[1] != weight.shape[1] or B.shape != (weight.shape[0], A.shape[0]):
            raise ValueError(
                f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit weight {tuple(weight.shape)}: expected "
                f"A (r, {weight.shape[1]}) and B ({weight.shape[0]}, r)"
            )
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight, self.bias = _frozen_copy(weight), _frozen_copy(bias)
        self.lora_A = nn.Parameter(A.detach().clone())
        self.lora_B = nn.Parameter(B.detach().clone())
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the LoRA input, as peft does

    @classmethod
    def from_pool(cls, layer: FusedRank1PoolLinear) -> "DenseLoRALinear":
        return cls(layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, _dropout_of(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * lora


def _dropout_of(layer: FusedRank1PoolLinear) -> float:
    return getattr(layer.dropout, "p", 0.0)


def make_peft_lora(layer: FusedRank1PoolLinear) -> nn.Module:
    """peft's LoRA layer (lora.Linear) around a frozen nn.Linear with the pool layer's W, b, A, B and scaling
    (lora_alpha = alpha, r = r, so peft's scaling alpha / r equals ours) and the same dropout on the LoRA input."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    base = layer.to_linear().requires_grad_(False)
    dropout = _dropout_of(layer)
    config = LoraConfig(r=layer.r, lora_alpha=layer.alpha, lora_dropout=dropout, target_modules=["base"])
    peft_layer = PeftLoraLinear(base, "default", config, r=layer.r, lora_alpha=layer.alpha, lora_dropout=dropout)
    base.requires_grad_(False)  # peft's standalone constructor leaves the base trainable; LoRA training freezes it
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    if abs(peft_layer.scaling["default"] - layer.scaling) > 1e-12:
        raise RuntimeError(f"peft scaling {peft_layer.scaling['default']} differs from ours {layer.scaling}")
    return peft_layer


class OfficialPoolLinear(nn.Module):
    """The released code's way: per sample top-k on the router scores of token 0, the k experts most voted
    across the batch form S, then  y = x W^T + b + x (s B[:, S] A[S, :])^T  with Delta W (out, in) materialised
    every step. Routing is rank1_kernels.route(mode="batch", gate="none"), so S is the set our layer picks with
    routing="batch"; activation counts are kept as the released code keeps them; the layer's dropout applies to the
    input of the second GEMM (the LoRA input), as there.

    Input: (N, T, in) when batch_first, (T, N, in) when not; the routing token is token 0 of each sample."""

    def __init__(self, layer: FusedRank1PoolLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.r, self.k, self.scaling, self.batch_first = layer.r, layer.k, layer.scaling, layer.batch_first
        self.weight, self.bias = _frozen_copy(layer.weight), _frozen_copy(layer.bias)
        self.lora_A = nn.Parameter(layer.lora_A.detach().clone())
        self.lora_B = nn.Parameter(layer.lora_B.detach().clone())
        self.router = nn.Linear(layer.in_features, layer.r, device=layer.weight.device, dtype=layer.weight.dtype)
        self.router.load_state_dict(layer.router.state_dict())
        self.register_buffer("activation_counts", torch.zeros(layer.r, dtype=torch.int64, device=layer.weight.device))
        self.dropout = nn.Dropout(_dropout_of(layer)) if _dropout_of(layer) > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(
                f"OfficialPoolLinear expects 3-D input (batch, tokens, in) or (tokens, batch, in), got {tuple(x.shape)}"
            )
        routing_tokens = x[:, 0] if self.batch_first else x[0]
        idx, _ = route(routing_tokens, self.router.weight, self.router.bias, self.k, mode="batch", gate="none",
                       backend="reference")  # the released code routes with PyTorch ops
        shared = idx[0]  # (k,): the batch-shared expert set S
        if self.training:
            with torch.no_grad():
                self.activation_counts.index_add_(0, shared, torch.ones_like(shared))
        delta_weight = (self.lora_B[:, shared] @ self.lora_A[shared, :]) * self.scaling  # (out, in), every step
        return F.linear(x, self.weight, self.bias) + F.linear(self.dropout(x), delta_weight)


def ago_loss_loop(
    B_curs: Sequence[torch.Tensor], B_prevs: Sequence[torch.Tensor], cur_top: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The released code's AGO loss: for each layer sum |B_cur[:, top]^T B_prev|, averaged over layers.
    B_curs[i]: (d_out_i, r), B_prevs[i]: (d_out_i, n_prev_i), cur_top[i]: (top_m,) int64. Returns a scalar."""
    total = B_curs[0].new_zeros(())
    for B_cur, B_prev, top in zip(B_curs, B_prevs, cur_top):
        total = total + (B_cur[:, top].t() @ B_prev).abs().sum()
    return total / len(B_curs)
