"""Bench-only backends that pin one choice of a fast kernel's dispatcher, so the sweep can check its choices.

The Triton pool linear decides two things from the shapes (rank1_kernels.triton_pool_linear):
    variant  "gather" reads only the k chosen rows of A and columns of B per sample; "mask" projects all r experts
             and masks them (`choose_variant`);
    shrink   "fused" computes the rank activations inside the base GEMM's K loop; "separate" runs a shrink kernel
             before it (`choose_shrink`, per GEMM launch).
`register_triton_variants()` adds backends "triton-gather" and "triton-mask" (variant pinned, shrink chosen as
usual), "triton-shrink-fused" and "triton-shrink-separate" (shrink pinned, variant chosen as usual), and
"triton-torch-routing" (nothing pinned, routed by PyTorch instead of the routing kernel). They accept what the
"triton" backend accepts (the fused pin also refuses a pool whose slots do not fit the fused shrink, rather than
being timed as the separate one), route with the routing kernel as "triton" does (all but the last), refuse the
AGO op (it has one kernel, timed as "triton"), and sit after every real backend in priority, so backend="auto"
never picks them.
"""

from __future__ import annotations

import torch

from rank1_kernels.backends import register_backend

VARIANT_PRIORITY = 1000  # after every real backend: "auto" must never pick a bench-only backend
_REGISTERED: set[str] = set()


def is_bench_variant(backend: str) -> bool:
    """Whether `backend` is one of the bench-only backends registered here (the layer sweeps time them; the
    whole-step benchmark leaves them out, as they would double its time for what the layer rows show)."""
    return backend in _REGISTERED


def register_triton_variants() -> tuple[list[str], str | None]:
    """Register one backend per pinned variant and per pinned shrink. Returns (the names registered, None) or
    ([], why not) when the Triton backend cannot be imported here."""
    try:
        from rank1_kernels import triton_pool_linear as tp
        from rank1_kernels.triton_backend import TritonBackend
    except Exception as exc:  # Triton missing or the backend broken: the sweep goes on without the variants
        return [], f"{type(exc).__name__}: {exc}"

    class Pinned(TritonBackend):
        variant = "auto"
        shrink = "auto"

        def refuse_reason(self, op, tensors):
            if op == "ago_grouped":
                return f"pins a pool-linear choice for the bench; {op} is timed as 'triton'"
            reason = super().refuse_reason(op, tensors)  # routing too: every pool[triton-*] row routes as 'triton'
            if op == "route":
                return reason
            if reason is None and self.shrink == "fused":
                x, A = tensors[0], [t for t in tensors[2:] if t.dim() == 2][0]
                idx = next(t for t in tensors if t.dtype == torch.int64)
                n_samples, k = idx.shape
                variant = tp.choose_variant(A.shape[0], k, x.shape[0] // max(n_samples, 1))
                n_slots = k if variant == "gather" else A.shape[0]
                if n_slots > tp.FUSED_SHRINK_MAX_SLOTS:
                    return (f"the {variant} variant has {n_slots} slots per row; the fused shrink holds at most "
                            f"{tp.FUSED_SHRINK_MAX_SLOTS}")  # fmt: skip
            return reason

        def pool_linear(self, x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input):
            return tp.triton_pool_linear(x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input,
                                         variant=self.variant, shrink=self.shrink)  # fmt: skip

    class TorchRouting(Pinned):
        """The Triton pool linear as "triton" runs it, routed by PyTorch (no routing kernel): against pool[triton],
        what the routing kernel saves."""

        name = "triton-torch-routing"
        optional_ops = ()

    pins = [{"variant": v} for v in tp.VARIANTS] + [{"shrink": s} for s in tp.SHRINKS]
    names = []
    for offset, pin in enumerate(pins):
        label = pin.get("variant") or f"shrink-{pin['shrink']}"
        backend = type(f"PinnedTriton_{label.replace('-', '_')}", (Pinned,), {"name": f"triton-{label}", **pin})
        register_backend(backend.name, VARIANT_PRIORITY + offset, backend)
        names.append(backend.name)
    register_backend(TorchRouting.name, VARIANT_PRIORITY + len(pins), TorchRouting)
    names.append(TorchRouting.name)
    _REGISTERED.update(names)
    return names, None
