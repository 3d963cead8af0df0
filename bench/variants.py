"""Bench-only backends that pin one variant of a fast kernel, so the sweep can check the dispatcher's choice.

The Triton pool linear has two variants (rank1_kernels.triton_pool_linear: "gather" reads only the k chosen rows
of A and columns of B per sample; "mask" projects all r experts and masks them) and picks one from the shapes.
`register_triton_variants()` adds backends "triton-gather" and "triton-mask" that always run one of them; they
accept exactly what the "triton" backend accepts, refuse the AGO op (it has one kernel, timed as "triton"), and
sit after every real backend in priority, so backend="auto" never picks them.
"""

from __future__ import annotations

from rank1_kernels.backends import register_backend

VARIANT_PRIORITY = 1000  # after every real backend: "auto" must never pick a bench-only backend


def register_triton_variants() -> tuple[list[str], str | None]:
    """Register one backend per Triton pool-linear variant. Returns (the names registered, None) or
    ([], why not) when the Triton backend cannot be imported here."""
    try:
        from rank1_kernels.triton_backend import TritonBackend
        from rank1_kernels.triton_pool_linear import VARIANTS, triton_pool_linear
    except Exception as exc:  # Triton missing or the backend broken: the sweep goes on without the variants
        return [], f"{type(exc).__name__}: {exc}"

    names = []
    for offset, variant in enumerate(VARIANTS):

        class PinnedVariant(TritonBackend):
            name = f"triton-{variant}"
            pinned_variant = variant

            def refuse_reason(self, op, tensors):
                if op != "pool_linear":
                    return (
                        f"pins a pool-linear variant ({self.pinned_variant}) for the bench; {op} is timed as 'triton'"
                    )
                return super().refuse_reason(op, tensors)

            def pool_linear(self, x, weight, bias, A, B, idx, gates, scaling, tokens_per_sample, lora_input):
                return triton_pool_linear(
                    x,
                    weight,
                    bias,
                    A,
                    B,
                    idx,
                    gates,
                    scaling,
                    tokens_per_sample,
                    lora_input,
                    variant=self.pinned_variant,
                )

        register_backend(PinnedVariant.name, VARIANT_PRIORITY + offset, PinnedVariant)
        names.append(PinnedVariant.name)
    return names, None
