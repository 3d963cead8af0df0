"""PoolMultiheadAttention: nn.MultiheadAttention with separate q, k, v and out projections that can be pool layers.

nn.MultiheadAttention keeps q, k and v in one fused in_proj_weight and calls F.linear on it internally, so its
projections cannot be swapped one by one. This module holds them as four Linear-like submodules (each a
FusedRank1PoolLinear or a plain nn.Linear) and computes attention with F.scaled_dot_product_attention. Its
forward takes the arguments of nn.MultiheadAttention.forward and returns the same (output, weights) pair, so
open_clip's and OpenAI CLIP's residual blocks call it unchanged; `to_mha()` repacks it into the original type.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .module import linear_from


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention masks (bool: True = not allowed; float: added) as a float mask to add to scores."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class PoolMultiheadAttention(nn.Module):
    """Drop-in replacement for nn.MultiheadAttention (without bias_k/bias_v/add_zero_attn)."""

    def __init__(self, q_proj, k_proj, v_proj, out_proj, num_heads: int, dropout: float, batch_first: bool) -> None:
        super().__init__()
        self.embed_dim = q_proj.out_features
        if self.embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={num_heads}")
        self.kdim, self.vdim = k_proj.in_features, v_proj.in_features
        self.num_heads, self.head_dim = num_heads, self.embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        # What nn.TransformerEncoder(Layer) reads before its fused fast path (torch._transformer_encoder_layer_fwd),
        # which would use the packed weights and skip the pools: no packed in-projection, so it takes the module path.
        self.in_proj_weight = self.in_proj_bias = None
        self._qkv_same_embed_dim = False

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, wrap) -> "PoolMultiheadAttention":
        """Split `mha` into four nn.Linear copies and pass each through `wrap(role, linear)`, role in q, k, v, out."""
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise NotImplementedError(
                "nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not supported by inject(); "
                "exclude this module from the target patterns"
            )
        has_bias = mha.in_proj_bias is not None
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if has_bias else (None, None, None)
        projections = [wrap(role, linear_from(weight, bias)) for role, weight, bias in zip("qkv", weights, biases)]
        projections.append(wrap("out", linear_from(mha.out_proj.weight, mha.out_proj.bias)))
        return cls(*projections, num_heads=mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # Pool layers route on token 0 of each sample, so they see batch-first rows; one copy serves all
            # three projections in self-attention.
            same_kv = key is value
            same_qk = query is key
            query = query.transpose(0, 1).contiguous()
            key = query if same_qk else key.transpose(0, 1).contiguous()
            value = key if same_kv else value.transpose(0, 1).contiguous()
        n_samples, target_len, _ = query.shape
        source_len = key.shape[1]

        def heads(t: torch.Tensor, length: int) -> torch.Tensor:
            return t.reshape(n_samples, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(query), target_len)
        k = heads(self.k_proj(key), source_len)
        v = heads(self.v_proj(value), source_len)

        mask = _additive_mask(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(n_samples, self.num_heads, target_len, source_len)
        padding = _additive_mask(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding[:, None, None, :]
            mask = padding if mask is None else mask + padding
        causal = is_causal and mask is None
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / (self.head_dim**0.5)
            if causal:
                causal_mask = torch.ones(target_len, source_len, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal_mask, float("-inf"))
            elif mask is not None:
                scores = scores + mask
            weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p)
            attended = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)

        output = self.out_proj(attended.transpose(1, 2).reshape(n_samples, target_len, self.embed_dim))
        if unbatched:
            output = output.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            output = output.transpose(0, 1)
        return output, weights

    def to_mha(self) -> nn.MultiheadAttention:
        """The equivalent nn.MultiheadAttention with the current (merged) projection weights; unmerged pool
        experts are not included."""
        linears = [p.to_linear() if hasattr(p, "to_linear") else p for p in (self.q_proj, self.k_proj, self.v_proj)]
        out = self.out_proj.to_linear() if hasattr(self.out_proj, "to_linear") else self.out_proj
        has_bias = linears[0].bias is not None
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=has_bias, kdim=self.kdim, vdim=self.vdim,
            batch_first=self.batch_first, device=out.weight.device, dtype=out.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([lin.weight for lin in linears]))
            else:
                mha.q_proj_weight.copy_(linears[0].weight)
                mha.k_proj_weight.copy_(linears[1].weight)
                mha.v_proj_weight.copy_(linears[2].weight)
            if has_bias:
                mha.in_proj_bias.copy_(torch.cat([lin.bias for lin in linears]))
            mha.out_proj.weight.copy_(out.weight)
            if out.bias is not None:
                mha.out_proj.bias.copy_(out.bias)
        # As frozen as the projections were (a packed weight is trainable when any of its parts is).
        trainable = {"in_proj_weight": any(lin.weight.requires_grad for lin in linears),
                     "q_proj_weight": linears[0].weight.requires_grad, "k_proj_weight": linears[1].weight.requires_grad,
                     "v_proj_weight": linears[2].weight.requires_grad,
                     "in_proj_bias": has_bias and any(lin.bias.requires_grad for lin in linears),
                     "out_proj.weight": out.weight.requires_grad,
                     "out_proj.bias": out.bias is not None and out.bias.requires_grad}  # fmt: skip
        for name, parameter in mha.named_parameters():
            parameter.requires_grad_(trainable[name])
        return mha

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"
