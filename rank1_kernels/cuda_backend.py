"""The "cuda" backend: hand-written CUDA C++ kernels (csrc/) for the pool linear and the grouped AGO Gram.

The compiled extension defines the ops rank1::cuda_pool_linear_fwd/_bwd and rank1::cuda_ago_fwd/_bwd
(csrc/bindings.cpp, TORCH_LIBRARY_FRAGMENT); this module adds their fake (meta) implementations and autograd, so
torch.compile traces them like the Triton ops. The dense base products go through cuBLAS; the sparse shrink,
the gated expand added into the base output, and every gradient of A, B and the gates are our kernels, with fp32
accumulation and fixed reduction orders (deterministic).

The extension is optional: importing this module never fails because it is missing. It is found as the module
rank1_kernels._C (built by `RANK1_BUILD_CUDA=1 pip install -e . --no-build-isolation`) or loaded by
rank1_kernels.cuda_jit.load() (torch.utils.cpp_extension JIT build, for development).
"""

from __future__ import annotations

import importlib

import torch

from .backends import Backend, frozen_base_message, register_backend, trainable_base_reason

BUILD_COMMAND = "RANK1_BUILD_CUDA=1 pip install -e . --no-build-isolation"
JIT_COMMAND = "python -c 'import rank1_kernels.cuda_jit as j; j.load()'"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The op schemas, as csrc/bindings.cpp defines them (a test checks that the two agree).
SCHEMAS = {
    "cuda_pool_linear_fwd": (
        "cuda_pool_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor idx, Tensor gates, "
        "float scaling, int tokens_per_sample, Tensor? lora_input) -> (Tensor, Tensor)"
    ),
    "cuda_pool_linear_bwd": (
        "cuda_pool_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor A, Tensor B, Tensor idx, Tensor gates, "
        "Tensor u, float scaling, int tokens_per_sample, Tensor? lora_input, bool need_x, bool need_lora_input, "
        "bool need_A, bool need_B, bool need_gates) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "cuda_ago_fwd": (
        "cuda_ago_fwd(Tensor[] B_curs, Tensor[] B_prevs, Tensor[] cur_masks, Tensor[] prev_masks, int p) "
        "-> (Tensor, Tensor)"
    ),
    "cuda_ago_bwd": (
        "cuda_ago_bwd(Tensor grad, Tensor gram, Tensor[] B_curs, Tensor[] B_prevs, Tensor[] cur_masks, "
        "Tensor[] prev_masks, int p, bool prev_requires_grad) -> (Tensor, Tensor)"
    ),
}

_STATE: dict = {"ops_ready": False, "missing_reason": None}


def extension_missing_reason() -> str | None:
    """None when the rank1::cuda_* ops are loaded (importing rank1_kernels._C if it was built), else why not and
    the command that builds them."""
    if _STATE["ops_ready"]:
        return None
    if not hasattr(torch.ops.rank1, "cuda_pool_linear_fwd"):
        try:
            importlib.import_module("rank1_kernels._C")
        except ImportError as exc:
            _STATE["missing_reason"] = (
                f"the CUDA extension rank1_kernels._C is not built ({exc}); build it with `{BUILD_COMMAND}` on a "
                f"machine with nvcc, or JIT-compile it with `{JIT_COMMAND}`, or use backend='triton' / 'reference'"
            )
            return _STATE["missing_reason"]
    register_python_parts()
    return None


# ---- fake implementations and autograd (registered once the ops exist) ----------------------------------------


def _fake_pool_linear_fwd(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], idx.shape[1], dtype=torch.float32)


def _fake_pool_linear_bwd(grad_y, x, weight, A, B, idx, gates, u, scaling, tokens_per_sample, lora_input, need_x,
                          need_lora_input, need_A, need_B, need_gates):  # fmt: skip
    # The bindings make every input contiguous, so every gradient is row-major whatever its input's layout; a
    # gradient nobody asked for is an empty tensor.
    def maybe(need, like):
        return like.new_empty(like.shape) if need else x.new_empty(0)

    return maybe(need_x, x), maybe(need_lora_input, x), maybe(need_A, A), maybe(need_B, B), maybe(need_gates, gates)


def _fake_ago_fwd(B_curs, B_prevs, cur_masks, prev_masks, p):
    gram_size = sum(cur.shape[1] * prev.shape[1] for cur, prev in zip(B_curs, B_prevs))
    return B_curs[0].new_empty(len(B_curs), dtype=torch.float32), B_curs[0].new_empty(gram_size, dtype=torch.float32)


def _fake_ago_bwd(grad, gram, B_curs, B_prevs, cur_masks, prev_masks, p, prev_requires_grad):
    d_prev_size = sum(prev.numel() for prev in B_prevs) if prev_requires_grad else 0
    return B_curs[0].new_empty(sum(cur.numel() for cur in B_curs)), B_curs[0].new_empty(d_prev_size)


def _unpack(packed, like):
    """Per-layer views of a packed gradient buffer (layer after layer, each row-major)."""
    return [chunk.view(t.shape) for chunk, t in zip(packed.split([t.numel() for t in like]), like)]


def _pool_setup_context(ctx, inputs, output):
    x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input = inputs
    ctx.save_for_backward(x, weight, A, B, idx, gates, output[1], lora_input)
    ctx.scaling, ctx.tokens_per_sample = scaling, tokens_per_sample


def _pool_backward(ctx, grad_y, grad_u):
    x, weight, A, B, idx, gates, u, lora_input = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if needs[1] or needs[2]:
        raise RuntimeError(frozen_base_message("CUDA"))
    need_x, need_A, need_B, need_gates = needs[0], needs[3], needs[4], needs[6]
    need_lora_input = lora_input is not None and needs[9]
    dx, d_lora_input, dA, dB, dgates = torch.ops.rank1.cuda_pool_linear_bwd(
        grad_y, x, weight, A, B, idx, gates, u, ctx.scaling, ctx.tokens_per_sample, lora_input,
        need_x, need_lora_input, need_A, need_B, need_gates,
    )  # fmt: skip

    def wanted(grad, need):
        return grad if need else None

    return (wanted(dx, need_x), None, None, wanted(dA, need_A), wanted(dB, need_B), None, wanted(dgates, need_gates),
            None, None, wanted(d_lora_input, need_lora_input))  # fmt: skip


def _ago_setup_context(ctx, inputs, output):
    B_curs, B_prevs, cur_masks, prev_masks, p = inputs
    n_layers = len(B_curs)
    ctx.save_for_backward(output[1], *B_curs, *B_prevs, *cur_masks, *prev_masks)
    ctx.n_layers, ctx.p = n_layers, p


def _ago_backward(ctx, grad_losses, grad_gram):
    gram, *saved = ctx.saved_tensors
    n = ctx.n_layers
    B_curs, B_prevs, cur_masks, prev_masks = (saved[i * n : (i + 1) * n] for i in range(4))
    # For a Tensor[] input, needs_input_grad may hold one flag per tensor.
    need_cur, need_prev = (any(f) if isinstance(f, (list, tuple)) else bool(f) for f in ctx.needs_input_grad[:2])
    # One buffer per side, so that the op's device tables (offsets, not output pointers) stay the same every step.
    d_cur, d_prev = torch.ops.rank1.cuda_ago_bwd(
        grad_losses, gram, B_curs, B_prevs, cur_masks, prev_masks, ctx.p, need_prev
    )
    nothing = [None] * n  # a Tensor[] input takes a list of gradients, None for each mask
    d_curs = _unpack(d_cur, B_curs) if need_cur else nothing
    return d_curs, (_unpack(d_prev, B_prevs) if need_prev else nothing), nothing, nothing, None


def register_python_parts() -> None:
    """Fake implementations and autograd for the rank1::cuda_* ops (idempotent)."""
    if _STATE["ops_ready"]:
        return
    torch.library.register_fake("rank1::cuda_pool_linear_fwd")(_fake_pool_linear_fwd)
    torch.library.register_fake("rank1::cuda_pool_linear_bwd")(_fake_pool_linear_bwd)
    torch.library.register_fake("rank1::cuda_ago_fwd")(_fake_ago_fwd)
    torch.library.register_fake("rank1::cuda_ago_bwd")(_fake_ago_bwd)
    torch.library.register_autograd("rank1::cuda_pool_linear_fwd", _pool_backward, setup_context=_pool_setup_context)
    torch.library.register_autograd("rank1::cuda_ago_fwd", _ago_backward, setup_context=_ago_setup_context)
    _STATE["ops_ready"] = True


# ---- the backend ----------------------------------------------------------------------------------------------


class CudaBackend(Backend):
    """pool_linear and ago_grouped through the compiled rank1::cuda_* ops (CUDA tensors only)."""

    name = "cuda"
    # The device the compiled ops are registered for. The test build that runs the kernels as host threads
    # (tests/cuda_emulation/) registers them for CPU tensors and sets this to "cpu" in its own process.
    device_type = "cuda"

    def unavailable_reason(self):
        return extension_missing_reason()

    def refuse_reason(self, op, tensors):
        floating = [t for t in tensors if t.is_floating_point()]
        if not floating:
            return None  # nothing to compute
        dtype, device = floating[0].dtype, floating[0].device
        if device.type != self.device_type:
            return f"the CUDA kernels run on CUDA tensors only, got {device.type}; use backend='reference' on CPU"
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported by the CUDA kernels (bf16, fp16, fp32); use backend='reference'"
        if any(t.dtype != dtype for t in floating):
            return "all floating inputs must share one dtype for the CUDA kernels"
        return trainable_base_reason(op, tensors, "CUDA") or extension_missing_reason()

    def pool_linear(self, x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input):
        y, _ = torch.ops.rank1.cuda_pool_linear_fwd(
            x, weight, bias, A, B, idx, gates, float(scaling), tokens_per_sample, lora_input
        )
        return y

    def ago_grouped(self, B_curs, B_prevs, cur_masks, prev_masks, p):
        if not B_curs:
            return torch.zeros(0)
        losses, _ = torch.ops.rank1.cuda_ago_fwd(B_curs, B_prevs, cur_masks, prev_masks, p)
        return losses.to(B_curs[0].dtype)  # fp32 sums, returned in the dtype of B as the reference does


register_backend("cuda", 20, CudaBackend)
