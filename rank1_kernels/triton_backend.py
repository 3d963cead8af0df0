"""The "triton" backend: fused Triton kernels for the pool linear and the grouped AGO Gram.

Importing this module registers the backend (rank1_kernels.backends imports it lazily on first use, so a missing
Triton never breaks `import rank1_kernels`). On a CUDA device "auto" picks it before the reference. CPU tensors run
through Triton's interpreter, only when forced by name (backend="triton") and only if TRITON_INTERPRET=1 was set
before this module was imported: that is how CI checks the kernels without a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ._checks import _may_read_back, check_finite_scores
from .backends import Backend, register_backend, trainable_base_reason
from .routing import shared_ones
from .triton_ago import ago_refuse_reason, triton_ago_grouped
from .triton_pool_linear import is_interpreted, triton_pool_linear
from .triton_routing import MAX_EXPERTS, triton_route

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _on_device_of(tensor: torch.Tensor):
    """Triton launches on the current CUDA device and its stream, not on the tensors' device: a model on cuda:1
    while device 0 is current needs a guard (its kernels would get another GPU's pointers). Backward needs none:
    autograd runs a device's backward with that device current. Compiled graphs set devices themselves."""
    if tensor.is_cuda and not torch.compiler.is_compiling() and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


class TritonBackend(Backend):
    """pool_linear (gather or shrink-all + mask, chosen by shape), ago_grouped (one launch for all layers) and route
    (scores, top k, gates and counts in one launch)."""

    name = "triton"
    optional_ops = ("route",)

    def refuse_reason(self, op, tensors):
        floating = [t for t in tensors if t.is_floating_point()]
        if not floating:
            return None  # nothing to compute (an empty group of layers)
        dtype, device = floating[0].dtype, floating[0].device
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported by the Triton kernels (bf16, fp16, fp32); use backend='reference'"
        if device.type == "cpu" and not is_interpreted():
            return (
                "CPU tensors run only through Triton's interpreter, which must be enabled before the kernels are "
                "imported: set TRITON_INTERPRET=1 in the environment before importing rank1_kernels (slow; for "
                "tests), move the tensors to a CUDA device, or use backend='reference'"
            )
        if device.type not in ("cpu", "cuda"):
            return (f"tensors on {device.type} are not supported (CUDA, or CPU under the interpreter); "
                    f"use backend='reference'")  # fmt: skip
        reason = trainable_base_reason(op, tensors, "Triton")
        if reason is not None:
            return reason
        if op == "ago_grouped":
            half = len(tensors) // 2
            return ago_refuse_reason(tensors[:half], tensors[half:])
        if op == "route" and tensors[1].shape[0] > MAX_EXPERTS:
            n_experts = tensors[1].shape[0]
            return f"the routing kernel holds at most {MAX_EXPERTS} experts' scores per sample, got r={n_experts}"
        return None

    def auto_ok(self, op, tensors):
        # The interpreter is far too slow to be picked silently: "auto" takes Triton on compiled CUDA kernels only.
        return bool(tensors) and tensors[0].device.type == "cuda" and not is_interpreted()

    def pool_linear(self, x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input):
        with _on_device_of(x):
            return triton_pool_linear(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input)

    def ago_grouped(self, B_curs, B_prevs, cur_masks, prev_masks, p):
        with _on_device_of(B_curs[0]) if B_curs else contextlib.nullcontext():
            return triton_ago_grouped(B_curs, B_prevs, cur_masks, prev_masks, p)

    def route(self, tokens, router_weight, router_bias, k, mode, counts, check_finite, gate):
        if check_finite and _may_read_back(tokens):  # the kernel never writes the scores out: PyTorch computes
            # them for the check alone (on CPU, or on a GPU after set_device_sync_checks(True))
            check_finite_scores(F.linear(tokens, router_weight, router_bias))
        with _on_device_of(tokens):
            idx, gates = triton_route(tokens, router_weight, router_bias, k, mode, counts, gate)
        return idx, gates if gates is not None else shared_ones(idx.shape, tokens.dtype, tokens.device)


register_backend("triton", 10, TritonBackend)
