"""Backends: who computes an op, what each supports, and why it refuses.

Every backend implements the same ops with the same signatures as the reference:
    pool_linear(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input) -> y
    ago_grouped(B_curs, B_prevs, cur_masks, prev_masks, p) -> (n_layers,) per-layer losses
and may implement the routing (`rank1_kernels.routing.route_reference`):
    route(tokens, router_weight, router_bias, k, mode, counts, check_finite, gate) -> idx, gates
`backend="auto"` takes the first backend in priority order that accepts the inputs; a backend forced by name
that cannot run raises an error naming the reason and the fix. Routing is not what a backend is chosen for: where
the chosen one has no routing kernel or refuses the inputs, the reference routes. Fast backends register themselves
from their own modules (imported lazily, so a missing Triton or CUDA extension never breaks `import rank1_kernels`).
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import torch

OPS = ("pool_linear", "ago_grouped", "route")
# Ops a backend may leave to the reference (a forced backend that does not run them falls back instead of raising).
OPTIONAL_OPS = ("route",)


class Backend:
    """Base class. Subclasses set `name`, list the optional ops they implement and implement the ops."""

    name: str = ""
    optional_ops: tuple[str, ...] = ()

    def refuse_reason(self, op: str, tensors: Sequence[torch.Tensor]) -> str | None:
        """None when this backend can run `op` on these inputs, else a sentence saying why not and how to fix it."""
        raise NotImplementedError

    def unavailable_reason(self) -> str | None:
        """None when this backend's kernels are there to run, else why not and how to get them (the CUDA backend
        registers with the package, its compiled extension may be missing)."""
        return None

    def auto_ok(self, op: str, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether "auto" may pick this backend for these inputs (e.g. Triton runs CPU tensors only through its
        slow interpreter: allowed when forced by name, never picked automatically)."""
        return True

    def pool_linear(self, x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input):
        raise NotImplementedError

    def ago_grouped(self, B_curs, B_prevs, cur_masks, prev_masks, p):
        raise NotImplementedError

    def route(self, tokens, router_weight, router_bias, k, mode, counts, check_finite, gate):
        raise NotImplementedError


class ReferenceBackend(Backend):
    """Plain PyTorch: runs everywhere, differentiable by autograd; the oracle the fast backends are tested against."""

    name = "reference"
    optional_ops = OPTIONAL_OPS

    def refuse_reason(self, op, tensors):
        return None

    def pool_linear(self, x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input):
        from .pool_linear import rank1_pool_linear_ref

        return rank1_pool_linear_ref(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input)

    def ago_grouped(self, B_curs, B_prevs, cur_masks, prev_masks, p):
        from .ago import ago_loss_grouped_ref

        return ago_loss_grouped_ref(B_curs, B_prevs, cur_masks, prev_masks, p)

    def route(self, tokens, router_weight, router_bias, k, mode, counts, check_finite, gate):
        from .routing import route_reference

        return route_reference(tokens, router_weight, router_bias, k, mode, counts, check_finite, gate)


def trainable_base_reason(op: str, tensors: Sequence[torch.Tensor], kernels: str) -> str | None:
    """The fused kernels compute no dW or dbias: a reason to refuse a pool_linear whose base weight or bias
    requires grad while autograd records. tensors = [x, weight, bias?, A, B, idx, gates, lora_input?]: the
    weight is second and the bias the only 1-D one."""
    if op != "pool_linear" or not torch.is_grad_enabled():
        return None
    frozen = [tensors[1]] + [t for t in tensors if t.dim() == 1]
    return frozen_base_message(kernels) if any(t.requires_grad for t in frozen) else None


def frozen_base_message(kernels: str) -> str:
    """What a fused backend says (refusing, or in its backward) when the base weight or bias requires grad."""
    return (
        f"the {kernels} kernels keep the base weight and bias frozen (no dW, no dbias) but one requires grad; "
        f"call weight.requires_grad_(False) / bias.requires_grad_(False) or use backend='reference'"
    )


# name -> (priority for "auto": lower first, factory). Each factory runs once, when registered (_INSTANCES); an
# optional backend registers when its module is first needed (_LAZY_MODULES).
_REGISTRY: dict[str, tuple[int, Callable[[], Backend]]] = {"reference": (100, ReferenceBackend)}
# Backends that live in optional modules; importing them registers them. A failed import is remembered as the reason.
_LAZY_MODULES: dict[str, str] = {}
# Made when registered, not on first use: a first use inside torch.compile would add to this dict while tracing, and
# the guard on it would make the next call compile everything again (a minute or more for a whole CLIP).
_INSTANCES: dict[str, Backend] = {name: factory() for name, (_, factory) in _REGISTRY.items()}
_IMPORT_ERRORS: dict[str, str] = {}


def register_backend(name: str, priority: int, factory: Callable[[], Backend]) -> None:
    instance = factory()  # first: a factory that fails registers nothing
    _REGISTRY[name] = (priority, factory)
    _INSTANCES[name] = instance


def register_lazy_backend(name: str, module: str) -> None:
    """Declare that importing `module` registers backend `name` (kept out of the import of rank1_kernels)."""
    _LAZY_MODULES[name] = module


# Run eagerly even inside torch.compile (an import cannot be traced): the first "auto" may happen in a compiled region.
@torch.compiler.assume_constant_result
def _load_lazy(name: str) -> None:
    module = _LAZY_MODULES.get(name)
    if module is None or name in _REGISTRY or name in _IMPORT_ERRORS:
        return
    try:
        importlib.import_module(module)
    except Exception as exc:  # an optional dependency missing or broken: remember why, never fail the import
        _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"


def available_backends() -> list[str]:
    """The backends that can run here, in "auto"'s priority order: registered, and with their kernels present."""
    return [name for name in _registered() if _INSTANCES[name].unavailable_reason() is None]


def _registered() -> list[str]:
    """Every registered backend in priority order ("auto" asks each in turn; one without kernels refuses)."""
    for name in list(_LAZY_MODULES):
        _load_lazy(name)
    return sorted(_REGISTRY, key=lambda n: _REGISTRY[n][0])


def known_backends() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def check_backend_name(name: str) -> None:
    """A misspelt backend is an error where it is given (a layer, a PoolConfig), not at the first forward."""
    if name != "auto" and name not in known_backends():
        raise _unknown_backend(name)


def _unknown_backend(name: str) -> ValueError:
    return ValueError(f"unknown backend {name!r}; expected 'auto' or one of {', '.join(map(repr, known_backends()))}")


def get_backend(name: str) -> Backend:
    _load_lazy(name)
    if name not in _REGISTRY:
        if name in _IMPORT_ERRORS:
            raise RuntimeError(f"backend={name!r} is not available: {_IMPORT_ERRORS[name]}")
        raise _unknown_backend(name)
    return _INSTANCES[name]


def resolve_backend(name: str, op: str, tensors: Sequence[torch.Tensor]) -> Backend:
    """The backend that runs `op` on `tensors`: the named one (or an error saying why it cannot), or for "auto" the
    first in priority order that accepts them."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if name == "auto":
        for candidate in _registered():
            backend = get_backend(candidate)
            if _runs(backend, op, tensors) is None and backend.auto_ok(op, tensors):
                return backend
        raise RuntimeError(f"no backend accepts {op} on these inputs")  # unreachable: the reference accepts all
    backend = get_backend(name)
    reason = _runs(backend, op, tensors)
    if reason is not None:
        if op in OPTIONAL_OPS:
            return get_backend("reference")
        raise RuntimeError(f"backend={name!r} cannot run {op} here: {reason}")
    return backend


def _runs(backend: Backend, op: str, tensors: Sequence[torch.Tensor]) -> str | None:
    """None when `backend` runs `op` on these inputs, else why not."""
    if op in OPTIONAL_OPS and op not in backend.optional_ops:
        return f"the {backend.name} backend has no {op} kernel"
    return backend.refuse_reason(op, tensors)


register_lazy_backend("triton", "rank1_kernels.triton_backend")
register_lazy_backend("cuda", "rank1_kernels.cuda_backend")
