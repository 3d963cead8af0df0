"""The eager path of a registered op: the op's body called through a torch.autograd.Function.

Calling a torch.library custom op goes through the dispatcher (defaults, schema, redispatch to autograd): tens of
microseconds of host time per call, more than a layer's kernels take on a GPU at ViT-B/16 shapes. In eager mode the
Triton ops therefore call their bodies through a Function built here, with the same saved tensors and backward;
torch.compile traces the registered op (what it needs for a graph without breaks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def eager_function(name: str, forward: Callable, setup_context: Callable, gradients: Callable,
                   backward_kernels: Callable) -> type[torch.autograd.Function]:  # fmt: skip
    """A Function whose forward runs `forward(*inputs)` (the op's body: the result first, then tensors kept for
    backward), saves what `setup_context` saves and returns the result; whose backward returns
    `gradients(ctx, grad, backward_kernels)`, as the registered op's autograd does with the backward op."""

    def forward_(ctx, *inputs):
        outputs = forward(*inputs)
        setup_context(ctx, inputs, outputs)
        return outputs[0]

    @torch.autograd.function.once_differentiable  # the kernels' gradients are not differentiable again
    def backward_(ctx, grad):
        return gradients(ctx, grad, backward_kernels)

    doc = f"The registered op's body in eager mode, without the dispatcher (built by {__name__}.eager_function)."
    return type(name, (torch.autograd.Function,), {"__doc__": doc, "forward": staticmethod(forward_),
                                                    "backward": staticmethod(backward_)})  # fmt: skip


def call(registered_op, eager: type[torch.autograd.Function], inputs: tuple) -> torch.Tensor:
    """The op's first result, through the registered op while torch.compile traces, else through `eager`."""
    if torch.compiler.is_compiling():
        return registered_op(*inputs)[0]
    return eager.apply(*inputs)
