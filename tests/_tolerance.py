"""The project's tolerance rule (STYLE.md 4): a fast result's error against an fp64 oracle may be at most twice
the error of the reference op run in the same dtype, plus a floor of a few units in the last place of the
output's scale (so that an exact reference does not demand bit equality)."""

from __future__ import annotations

import torch

ULPS_FLOOR = 4


def max_abs_error(actual: torch.Tensor, oracle: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    diff = (actual.detach().double().cpu() - oracle.detach().double().cpu()).abs()
    if diff.numel() == 0:
        return 0.0, ()
    flat = int(diff.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return float(diff.reshape(-1)[flat]), index


def assert_close_by_rule(actual: torch.Tensor, same_dtype_reference: torch.Tensor, oracle: torch.Tensor, what: str):
    """actual and same_dtype_reference computed in the dtype under test, oracle in float64 from the same inputs."""
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(oracle.shape)}"
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{what}: result has non-finite entries")
    reference_error, _ = max_abs_error(same_dtype_reference, oracle)
    error, worst = max_abs_error(actual, oracle)
    scale = float(oracle.detach().abs().max()) if oracle.numel() else 0.0
    floor = ULPS_FLOOR * torch.finfo(actual.dtype).eps * max(scale, 1.0)
    bound = 2.0 * reference_error + floor
    if error > bound:
        raise AssertionError(
            f"{what}: max error {error:.3e} vs fp64 exceeds 2 x reference error ({reference_error:.3e}) + floor "
            f"{floor:.1e}; worst at {worst}: got {float(actual.detach().double().cpu()[worst]):.6g}, "
            f"fp64 {float(oracle.detach().double().cpu()[worst]):.6g}, dtype {actual.dtype}"
        )
