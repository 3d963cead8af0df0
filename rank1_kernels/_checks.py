"""Input validation shared by the ops and modules: every error says what was wrong and what was expected."""

from __future__ import annotations

import torch

ROUTING_MODES = ("sample", "batch")
GATE_KINDS = ("none", "softmax", "sigmoid")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, allowed))}")


def check_top_k(k: int, r: int, what: str = "k") -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{what} must be an int, got {type(k).__name__}")
    if not 1 <= k <= r:
        raise ValueError(f"{what}={k} is out of range: expected 1 <= {what} <= r={r} (the number of experts)")


def check_counts(counts: torch.Tensor, n_experts: int, device: torch.device) -> None:
    """Activation counts: one int64 per expert, on the routing tokens' device (the routing kernel adds to them)."""
    if counts.shape != (n_experts,) or counts.dtype != torch.int64 or counts.device != device:
        raise ValueError(
            f"counts must be int64 of shape (r={n_experts},) on {device}, got {counts.dtype} {tuple(counts.shape)} "
            f"on {counts.device}"
        )


def check_same_device_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """All floating tensors in `others` must live on the device and have the dtype of `reference`."""
    for name, tensor in others.items():
        if tensor is None:
            continue
        if tensor.device != reference.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {reference_name} is on {reference.device}; "
                f"move them to the same device (e.g. {name}.to({reference_name}.device))"
            )
        if tensor.dtype != reference.dtype:
            raise ValueError(
                f"{name} has dtype {tensor.dtype} but {reference_name} has dtype {reference.dtype}; "
                f"cast one of them so both share a dtype"
            )


def check_last_dim(name: str, tensor: torch.Tensor, expected: int, meaning: str) -> None:
    if tensor.shape[-1] != expected:
        raise ValueError(
            f"{name} has last dimension {tensor.shape[-1]} but {expected} was expected ({meaning}); "
            f"got shape {tuple(tensor.shape)}"
        )


def check_rows_divisible(n_rows: int, tokens_per_sample: int) -> int:
    """Returns the number of samples; rows are laid out sample-major (sample s owns a contiguous block)."""
    if not isinstance(tokens_per_sample, int) or isinstance(tokens_per_sample, bool) or tokens_per_sample < 1:
        raise ValueError(f"tokens_per_sample must be a positive int, got {tokens_per_sample!r}")
    if n_rows % tokens_per_sample != 0:
        raise ValueError(
            f"tokens_per_sample={tokens_per_sample} does not divide the {n_rows} input rows; "
            f"expected rows = n_samples * tokens_per_sample with each sample's tokens contiguous"
        )
    return n_rows // tokens_per_sample


# Checks that read a value back from a GPU stall the stream once per layer and forward; on GPU they run only
# when asked for (set_device_sync_checks(True)), on CPU tensors always.
_DEVICE_SYNC_CHECKS = {"enabled": False}


def set_device_sync_checks(enabled: bool) -> None:
    """Turn on (or off) the input checks that need a host sync on GPU tensors: NaN/Inf in routing scores, and expert
    indices outside [0, r) passed to the op. Off by default on GPU for speed: a non-finite routing token also makes
    the layer's output non-finite, so the loss shows it; turn this on to find the layer where it starts. (The
    module's router never produces an index out of range; a hand-made idx could.)"""
    _DEVICE_SYNC_CHECKS["enabled"] = bool(enabled)


def _may_read_back(tensor: torch.Tensor) -> bool:
    """Whether a check may read values of `tensor` back to the host: never while compiling; on CPU always; on
    accelerators only when set_device_sync_checks(True) was called, and never while capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if tensor.device.type == "cpu":
        return True
    return _DEVICE_SYNC_CHECKS["enabled"] and not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def check_finite_scores(scores: torch.Tensor) -> None:
    """Routing on NaN/Inf would pick arbitrary experts silently; refuse instead (a check that reads the device:
    see _may_read_back)."""
    if not _may_read_back(scores):
        return
    if scores.numel() and not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores)).nonzero()[0].tolist()
        raise ValueError(
            f"routing scores contain NaN or Inf (first at sample {bad[0]}, expert {bad[1]}); "
            f"check the routing tokens and router weights for non-finite values"
        )


def check_expert_range(idx: torch.Tensor, n_experts: int) -> None:
    """Expert indices outside [0, r) would make the fused kernels read outside A and B; refuse instead (a check
    that reads the device: see _may_read_back)."""
    if not idx.numel() or not _may_read_back(idx):
        return
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= n_experts:
        raise ValueError(f"idx holds expert {low if low < 0 else high}, outside [0, r={n_experts})")
