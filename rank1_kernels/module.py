"""FusedRank1PoolLinear: a drop-in nn.Linear with a pool of r rank-1 experts, k chosen per sample."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._checks import (
    GATE_KINDS,
    ROUTING_MODES,
    _may_read_back,
    check_choice,
    check_last_dim,
    check_rows_divisible,
    check_same_device_dtype,
    check_top_k,
)
from .backends import check_backend_name
from .pool_linear import rank1_pool_linear
from .routing import route, top_experts

# Buffers whose length grows with every merge; resized on load so that any history can be restored.
_HISTORY_BUFFERS = ("merged_A", "merged_B", "merged_scaling", "merge_sizes")


def _recomputing_in_backward() -> bool:
    """True while autograd runs a backward pass: a forward then is activation checkpointing recomputing the layer,
    which must not count its routing choices a second time."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` (out, in) and `bias`, each trainable exactly when its source is:
    splitting a projection or unloading a pool must neither unfreeze a frozen model nor freeze a trainable one."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        linear.bias.requires_grad_(bias.requires_grad)
    return linear


class FusedRank1PoolLinear(nn.Module):
    """y = x W^T + b + (alpha / r) * sum over the k experts chosen for x's sample of g_i (a_i . x) b_i.

    W and b are frozen; A (r, in_features), B (out_features, r) and the router Linear(in_features, r) train.
    A is kaiming-uniform and B zero, so a fresh layer computes exactly the base linear.

    Input layouts: (N, T, in) when batch_first (default; more leading dims are folded into T), (T, N, in) when
    not, (in,) as one sample, or 2-D (rows, in) with `tokens_per_sample=` or `routing_tokens=` given to
    forward (or set as attributes): the batch size is never guessed from the token count.
    The routing token of each sample is token `routing_token_index` (0: the [CLS] token of a ViT) of this
    layer's own input, unless routing_tokens (N, in) are passed explicitly or `routing_positions` (N,) int64
    names a token per sample (set by a hook, e.g. the end-of-text token of a causal text tower).

    Buffers: activation_counts (r,) counts how often each expert was chosen in training; merge(top_m) folds the
    most used experts into W and records them (merged_A, merged_B, ...) for unmerge() and for the AGO loss.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 12,
        k: int = 8,
        alpha: float = 1.0,
        routing: str = "sample",
        gate: str = "none",
        dropout: float = 0.0,
        backend: str = "auto",
        batch_first: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"r={r} must be >= 1 (the number of rank-1 experts)")
        check_top_k(k, r)
        check_choice("routing", routing, ROUTING_MODES)
        check_choice("gate", gate, GATE_KINDS)
        check_backend_name(backend)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.r, self.k, self.alpha = r, k, alpha
        self.routing, self.gate, self.backend = routing, gate, backend
        self.batch_first = batch_first
        self.routing_token_index = 0
        self.routing_positions: torch.Tensor | None = None
        self.tokens_per_sample: int | None = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.router = nn.Linear(in_features, r, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("activation_counts", torch.zeros(r, dtype=torch.int64, device=device))
        self.register_buffer("merged_A", torch.zeros(0, in_features, **factory))
        self.register_buffer("merged_B", torch.zeros(out_features, 0, **factory))
        self.register_buffer("merged_scaling", torch.zeros(0, dtype=torch.float64, device=device))
        self.register_buffer("merge_sizes", torch.zeros(0, dtype=torch.int64, device=device))
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 12,
        k: int = 8,
        alpha: float = 1.0,
        routing: str = "sample",
        gate: str = "none",
        dropout: float = 0.0,
        backend: str = "auto",
        batch_first: bool = True,
    ) -> "FusedRank1PoolLinear":
        """A pool layer whose base is a frozen copy of `linear`'s weight and bias (same device and dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, r=r, k=k, alpha=alpha,
            routing=routing, gate=gate, dropout=dropout, backend=backend, batch_first=batch_first,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def reset_parameters(self) -> None:
        """Base weight and bias as nn.Linear initialises them, then a fresh pool."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_pool()

    def pool_parameters(self) -> list[nn.Parameter]:
        """A, B and the router's parameters: what trains, and what reset_pool draws afresh."""
        return [self.lora_A, self.lora_B, *self.router.parameters()]

    def reset_pool(self) -> None:
        """A fresh pool (as at the start of a task): A kaiming-uniform, B zero, a new router, zero counts."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.router.reset_parameters()
        self.activation_counts.zero_()

    # ---- forward -------------------------------------------------------------------------------------------

    def _flatten(self, x: torch.Tensor, tokens_per_sample: int | None, routing_tokens: torch.Tensor | None):
        """(rows, in) sample-major, tokens_per_sample, and a function that restores the caller's layout."""
        if x.dim() == 1:
            return x.unsqueeze(0), 1, lambda y: y.squeeze(0)
        if x.dim() == 2:
            if tokens_per_sample is None and routing_tokens is not None:
                n_routing = routing_tokens.shape[0]
                if n_routing == 0 and x.shape[0] == 0:
                    tokens_per_sample = 1  # an empty batch, as a 3-D one with no samples: an empty output
                elif n_routing == 0 or x.shape[0] % n_routing:
                    raise ValueError(
                        f"{x.shape[0]} rows cannot be split evenly over {n_routing} routing tokens; "
                        f"expected rows = n_samples * tokens_per_sample"
                    )
                else:
                    tokens_per_sample = x.shape[0] // n_routing
            if tokens_per_sample is None:
                raise ValueError(
                    "2-D input (rows, in_features) needs tokens_per_sample= or routing_tokens= (the layer never "
                    "guesses the batch size from the token count); pass 3-D (batch, tokens, in_features) instead"
                )
            check_rows_divisible(x.shape[0], tokens_per_sample)
            return x, tokens_per_sample, lambda y: y
        if self.batch_first:
            n_samples = x.shape[0]
            tokens = math.prod(x.shape[1:-1])
            return x.reshape(n_samples * tokens, x.shape[-1]), tokens, lambda y: y.reshape(*x.shape[:-1], self.out_features)
        if x.dim() != 3:
            raise ValueError(f"sequence-first input must be 3-D (tokens, batch, in_features), got {tuple(x.shape)}")
        tokens, n_samples = x.shape[0], x.shape[1]
        rows = x.transpose(0, 1).reshape(n_samples * tokens, x.shape[-1])
        return rows, tokens, lambda y: y.reshape(n_samples, tokens, self.out_features).transpose(0, 1)

    def forward(
        self, x: torch.Tensor, tokens_per_sample: int | None = None, routing_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_last_dim("x", x, self.in_features, "in_features of this layer")
        check_same_device_dtype("x", x, weight=self.weight)
        tokens_per_sample = tokens_per_sample if tokens_per_sample is not None else self.tokens_per_sample
        rows, tokens_per_sample, restore = self._flatten(x, tokens_per_sample, routing_tokens)
        if tokens_per_sample == 0:  # samples without tokens: nothing to route, an empty output
            return restore(nn.functional.linear(rows, self.weight, self.bias))
        n_samples = rows.shape[0] // tokens_per_sample
        if routing_tokens is not None and routing_tokens.shape[0] != n_samples:
            raise ValueError(
                f"routing_tokens has {routing_tokens.shape[0]} rows for the {n_samples} samples of x "
                f"{tuple(x.shape)}; expected one routing token per sample"
            )
        if routing_tokens is None and self.routing_positions is not None:
            routing_tokens = self._tokens_at_routing_positions(rows, n_samples, tokens_per_sample)
        if routing_tokens is None:
            if not 0 <= self.routing_token_index < tokens_per_sample:
                raise ValueError(
                    f"routing_token_index={self.routing_token_index} is outside the {tokens_per_sample} tokens "
                    f"of each sample"
                )
            per_sample = rows.reshape(n_samples, tokens_per_sample, self.in_features)
            routing_tokens = per_sample.select(1, self.routing_token_index)
        counting = self.training and not _recomputing_in_backward()
        idx, gates = route(
            routing_tokens, self.router.weight, self.router.bias, self.k, self.routing, self.gate,
            counts=self.activation_counts if counting else None, backend=self.backend,
        )  # fmt: skip
        lora_input = self.dropout(rows) if self.training and isinstance(self.dropout, nn.Dropout) else None
        y = rank1_pool_linear(
            rows, self.weight, self.bias, self.lora_A, self.lora_B, idx, gates, self.scaling, tokens_per_sample,
            lora_input=lora_input, backend=self.backend,
        )  # fmt: skip
        return restore(y)

    def _tokens_at_routing_positions(self, rows: torch.Tensor, n_samples: int, tokens_per_sample: int) -> torch.Tensor:
        """(n_samples, in): token routing_positions[s] of each sample s of the sample-major rows."""
        positions = self.routing_positions
        if positions.shape != (n_samples,) or positions.dtype != torch.int64:
            raise ValueError(
                f"routing_positions must be int64 of shape (n_samples={n_samples},), got {positions.dtype} "
                f"{tuple(positions.shape)}; it was set for another batch (set it per forward, or to None)"
            )
        if _may_read_back(positions) and positions.numel():
            low, high = int(positions.min()), int(positions.max())
            if low < 0 or high >= tokens_per_sample:
                raise ValueError(
                    f"routing_positions holds token {low if low < 0 else high}, outside the {tokens_per_sample} tokens "
                    f"of each sample; expected 0 <= position < {tokens_per_sample}"
                )
        per_sample = rows.reshape(n_samples, tokens_per_sample, self.in_features)
        return per_sample[torch.arange(n_samples, device=rows.device), positions.to(rows.device)]

    # ---- merging -------------------------------------------------------------------------------------------

    def top_experts(self, top_m: int) -> torch.Tensor:
        """The top_m most activated experts of the current pool (ties to the lowest index), int64 (top_m,)."""
        check_top_k(top_m, self.r, what="top_m")
        return top_experts(self.activation_counts, top_m)

    def current_top_mask(self, top_m: int) -> torch.Tensor:
        """Boolean (r,) mask of the current top_m experts: the columns the AGO loss constrains."""
        mask = torch.zeros(self.r, dtype=torch.bool, device=self.activation_counts.device)
        return mask.index_fill(0, self.top_experts(top_m), True)

    @torch.no_grad()
    def merge(self, top_m: int = 4, reset_pool: bool = True) -> torch.Tensor:
        """W += scaling * B[:, top] A[top, :] for the top_m most used experts; returns their indices.

        The merged rows/columns are recorded (for unmerge() and the AGO loss of later tasks); with reset_pool
        a fresh pool starts, as between tasks. Computed in fp32 and rounded once into W's dtype."""
        top = self.top_experts(top_m)
        A_top, B_top = self.lora_A[top].detach(), self.lora_B[:, top].detach()
        self._add_to_weight(B_top, A_top, self.scaling)
        self.merged_A = torch.cat([self.merged_A, A_top])
        self.merged_B = torch.cat([self.merged_B, B_top], dim=1)
        scale = torch.full((top_m,), self.scaling, dtype=torch.float64, device=self.merged_scaling.device)
        self.merged_scaling = torch.cat([self.merged_scaling, scale])
        self.merge_sizes = torch.cat([self.merge_sizes, self.merge_sizes.new_tensor([top_m])])
        if reset_pool:
            self.reset_pool()
        return top

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo the most recent merge: W -= its update (exact up to rounding in W's dtype); history shrinks."""
        if self.merge_sizes.numel() == 0:
            raise RuntimeError("unmerge(): this layer has no merged experts")
        size = int(self.merge_sizes[-1])
        A_last, B_last = self.merged_A[-size:], self.merged_B[:, -size:]
        self._add_to_weight(B_last.to(self._merge_dtype) * self.merged_scaling[-size:], A_last, -1.0)
        self.merged_A, self.merged_B = self.merged_A[:-size].clone(), self.merged_B[:, :-size].clone()
        self.merged_scaling, self.merge_sizes = self.merged_scaling[:-size].clone(), self.merge_sizes[:-1].clone()

    @torch.no_grad()
    def reapply_merges(self) -> None:
        """Add every recorded merge to W, one at a time as merge() added them: for a history loaded into a layer
        whose W is the original base weight. W then equals the merging layer's bit for bit (one summed update
        would round differently), which exact resumption of training needs."""
        start = 0
        for size in self.merge_sizes.tolist():
            columns = slice(start, start + size)
            scale = float(self.merged_scaling[start])  # merge() records one scaling per merge
            self._add_to_weight(self.merged_B[:, columns].contiguous(), self.merged_A[columns].contiguous(), scale)
            start += size

    @property
    def _merge_dtype(self) -> torch.dtype:
        """Merges are computed in at least fp32 and rounded once into W's dtype."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    def _add_to_weight(self, B_cols: torch.Tensor, A_rows: torch.Tensor, scale: float) -> None:
        dtype = self._merge_dtype
        update = (B_cols.to(dtype) @ A_rows.to(dtype)) * scale
        self.weight.copy_((self.weight.to(dtype) + update).to(self.weight.dtype))

    def merged_delta(self) -> torch.Tensor:
        """Sum of all recorded merges, (out_features, in_features) in at least fp32: what merging added to W."""
        dtype = self._merge_dtype
        return (self.merged_B.to(dtype) * self.merged_scaling.to(dtype)) @ self.merged_A.to(dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the current (merged) weight and bias, as frozen as they are here. Unmerged pool
        experts are not included: call merge() first to keep them."""
        return linear_from(self.weight, self.bias)

    # ---- state ---------------------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # The merge history's scales stay float64 whatever the module is cast to: in bf16, alpha / r = 1/12 would
        # become 0.0835, and unmerge(), reapply_merges() and merged_delta() would disagree with the merges made.
        scales = self.merged_scaling
        result = super()._apply(fn, recurse)
        if self.merged_scaling.dtype != torch.float64:
            self.merged_scaling = scales.to(self.merged_scaling.device)
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        for name in _HISTORY_BUFFERS:
            incoming = state_dict.get(prefix + name)
            current = self._buffers[name]
            if incoming is not None and incoming.shape != current.shape:
                self._buffers[name] = current.new_empty(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, k={self.k}, alpha={self.alpha}, routing={self.routing!r}, gate={self.gate!r}, "
            f"dropout={getattr(self.dropout, 'p', 0.0)}, backend={self.backend!r}, merged={self.merged_A.shape[0]}"
        )

    def config(self) -> dict:
        """The constructor arguments that define this layer's pool (saved with adapters)."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
            "r": self.r, "k": self.k, "alpha": self.alpha, "routing": self.routing, "gate": self.gate,
            "dropout": getattr(self.dropout, "p", 0.0), "batch_first": self.batch_first,
            "routing_token_index": self.routing_token_index,
        }  # fmt: skip
