"""The pool linear op: a frozen linear plus k of r rank-1 experts per sample.

    y[row] = x[row] W^T + bias + scaling * sum_j gates[s, j] (lora_input[row] . A[idx[s, j]]) B[:, idx[s, j]]

for every row of sample s = row // tokens_per_sample (rows are sample-major). lora_input defaults to x; the
module passes a dropped-out copy of x there in training, as LoRA dropout acts on the adapter's input only.
With k == r and gates == 1 this is exactly the dense LoRA  x W^T + b + s (x A^T) B^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_expert_range, check_last_dim, check_rows_divisible, check_same_device_dtype, check_top_k
from .backends import resolve_backend


def rank1_pool_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    gates: torch.Tensor,
    scaling: float,
    tokens_per_sample: int,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference in plain PyTorch. x: (n_rows, d_in), weight: (d_out, d_in), bias: (d_out,) or None,
    A: (r, d_in), B: (d_out, r), idx: (n_samples, k) int64, gates: (n_samples, k). Returns (n_rows, d_out)."""
    n_rows, d_in = x.shape
    n_samples = n_rows // tokens_per_sample
    shrink_input = x if lora_input is None else lora_input
    # index_select, not A[idx]: the backward of advanced indexing accumulates repeated indices (samples choosing the
    # same expert) in a thread-dependent order on CPU, so gradients, and a continual run, changed from run to run;
    # index_select's backward (index_add) sums them in a fixed order there.
    n_selected = idx.numel()
    A_selected = A.index_select(0, idx.reshape(n_selected)).view(n_samples, idx.shape[1], d_in)
    B_selected = B.index_select(1, idx.reshape(n_selected)).t().reshape(n_samples, idx.shape[1], B.shape[0])
    hidden = torch.bmm(shrink_input.reshape(n_samples, tokens_per_sample, d_in), A_selected.transpose(1, 2))
    hidden = hidden * (gates * scaling).unsqueeze(1)  # (n_samples, tokens_per_sample, k)
    update = torch.bmm(hidden, B_selected).reshape(n_rows, B.shape[0])
    return F.linear(x, weight, bias) + update


def check_pool_linear_inputs(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input=None) -> int:
    """Validate shapes, dtypes and devices, and (on CPU, or on a GPU when asked for) the expert indices' range;
    returns n_samples."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (n_rows, d_in), got shape {tuple(x.shape)}; the module flattens batches")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    check_last_dim("x", x, d_in, "in_features of the weight")
    if A.dim() != 2 or A.shape[1] != d_in:
        raise ValueError(f"A must have shape (r, d_in={d_in}), got {tuple(A.shape)}")
    n_experts = A.shape[0]
    if B.shape != (d_out, n_experts):
        raise ValueError(f"B must have shape (d_out={d_out}, r={n_experts}), got {tuple(B.shape)}")
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    if lora_input is not None and lora_input.shape != x.shape:
        raise ValueError(f"lora_input must have the shape of x {tuple(x.shape)}, got {tuple(lora_input.shape)}")
    check_same_device_dtype("x", x, weight=weight, bias=bias, A=A, B=B, gates=gates, lora_input=lora_input)
    n_samples = check_rows_divisible(x.shape[0], tokens_per_sample)
    if idx.dtype != torch.int64:
        raise ValueError(f"idx must be int64 expert indices, got dtype {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != n_samples:
        raise ValueError(f"idx must have shape (n_samples={n_samples}, k), got {tuple(idx.shape)}")
    check_top_k(idx.shape[1], n_experts, what="idx.shape[1] (k)")
    if gates.shape != idx.shape:
        raise ValueError(f"gates must have the shape of idx {tuple(idx.shape)}, got {tuple(gates.shape)}")
    if idx.device != x.device:
        raise ValueError(f"idx is on {idx.device} but x is on {x.device}; move idx to x's device")
    check_expert_range(idx, n_experts)
    return n_samples


def rank1_pool_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    idx: torch.Tensor,
    gates: torch.Tensor,
    scaling: float,
    tokens_per_sample: int,
    lora_input: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Validated, dispatched pool linear; same arguments as `rank1_pool_linear_ref` plus the backend's name."""
    check_pool_linear_inputs(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input)
    tensors = [t for t in (x, weight, bias, A, B, idx, gates, lora_input) if t is not None]
    chosen = resolve_backend(backend, "pool_linear", tensors)
    return chosen.pool_linear(x, weight, bias, A, B, idx, gates, float(scaling), tokens_per_sample, lora_input)
