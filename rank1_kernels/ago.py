"""Activation-Guided Orthogonal (AGO) loss.

Per pool layer, the most-used experts of the current task should be orthogonal to the experts merged after
earlier tasks; only B columns are constrained:

    loss_layer = sum | (B_cur[:, cur_mask])^T B_prev[:, prev_mask] |^p          (p = 1 in the paper's code)

The masks multiply the columns instead of selecting them, so shapes stay static (no host sync, graph-safe);
masked-out columns contribute exactly zero. The model-level penalty is the mean over all pool layers.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .backends import resolve_backend


def _masked_gram(B_cur: torch.Tensor, B_prev: torch.Tensor, cur_mask: torch.Tensor, prev_mask: torch.Tensor):
    return (B_cur * cur_mask.to(B_cur.dtype)).t() @ (B_prev * prev_mask.to(B_prev.dtype))


def ago_loss_ref(
    B_cur: torch.Tensor, B_prev: torch.Tensor, cur_mask: torch.Tensor, prev_mask: torch.Tensor, p: int = 1
) -> torch.Tensor:
    """B_cur: (d_out, r_cur), B_prev: (d_out, r_prev), cur_mask: (r_cur,) bool, prev_mask: (r_prev,) bool.
    Returns the scalar sum over |masked Gram|^p (p = 1 or 2)."""
    gram = _masked_gram(B_cur, B_prev, cur_mask, prev_mask)
    return gram.abs().sum() if p == 1 else gram.square().sum()


def check_ago_inputs(B_curs, B_prevs, cur_masks, prev_masks, p) -> None:
    if p not in (1, 2):
        raise ValueError(f"p={p!r} is not supported; expected 1 (the paper's |.|) or 2 (squared)")
    lengths = {len(B_curs), len(B_prevs), len(cur_masks), len(prev_masks)}
    if len(lengths) != 1:
        raise ValueError(
            f"B_curs, B_prevs, cur_masks and prev_masks must list the same layers; got lengths "
            f"{len(B_curs)}, {len(B_prevs)}, {len(cur_masks)}, {len(prev_masks)}"
        )
    for layer, (B_cur, B_prev, cur_mask, prev_mask) in enumerate(zip(B_curs, B_prevs, cur_masks, prev_masks)):
        if B_cur.dim() != 2 or B_prev.dim() != 2 or B_cur.shape[0] != B_prev.shape[0]:
            raise ValueError(
                f"layer {layer}: B_cur {tuple(B_cur.shape)} and B_prev {tuple(B_prev.shape)} must be (d_out, r) "
                f"matrices with the same d_out"
            )
        if cur_mask.shape != (B_cur.shape[1],) or prev_mask.shape != (B_prev.shape[1],):
            raise ValueError(
                f"layer {layer}: masks must have one entry per column: cur_mask {tuple(cur_mask.shape)} for "
                f"{B_cur.shape[1]} columns, prev_mask {tuple(prev_mask.shape)} for {B_prev.shape[1]} columns"
            )
        if cur_mask.dtype != torch.bool or prev_mask.dtype != torch.bool:
            raise ValueError(
                f"layer {layer}: masks must be bool (True: the column is constrained), got cur_mask {cur_mask.dtype} "
                f"and prev_mask {prev_mask.dtype}; a weighted mask is not part of the AGO loss"
            )
        if B_cur.device != B_prev.device or B_cur.dtype != B_prev.dtype:
            raise ValueError(
                f"layer {layer}: B_cur ({B_cur.dtype}, {B_cur.device}) and B_prev ({B_prev.dtype}, {B_prev.device}) "
                f"must share dtype and device"
            )
        if cur_mask.device != B_cur.device or prev_mask.device != B_cur.device:
            raise ValueError(
                f"layer {layer}: the masks (on {cur_mask.device} and {prev_mask.device}) must be on B's device "
                f"{B_cur.device}; a fused kernel would read them through a pointer of another device"
            )


def ago_loss_grouped_ref(
    B_curs: Sequence[torch.Tensor],
    B_prevs: Sequence[torch.Tensor],
    cur_masks: Sequence[torch.Tensor],
    prev_masks: Sequence[torch.Tensor],
    p: int = 1,
) -> torch.Tensor:
    """Per-layer AGO losses, (n_layers,), for lists of layers of any sizes. A layer with no previous
    columns contributes 0."""
    losses = [ago_loss_ref(*layer, p=p) for layer in zip(B_curs, B_prevs, cur_masks, prev_masks)]
    if not losses:
        return torch.zeros(0)
    return torch.stack([loss.to(losses[0].dtype) for loss in losses])


def ago_loss(B_cur, B_prev, cur_mask, prev_mask, p: int = 1, backend: str = "auto") -> torch.Tensor:
    """Validated, dispatched single-layer AGO loss (a group of one)."""
    return ago_loss_grouped([B_cur], [B_prev], [cur_mask], [prev_mask], p=p, backend=backend)[0]


def ago_loss_grouped(B_curs, B_prevs, cur_masks, prev_masks, p: int = 1, backend: str = "auto") -> torch.Tensor:
    """Validated, dispatched per-layer AGO losses (n_layers,): one grouped launch on the fast backends."""
    check_ago_inputs(B_curs, B_prevs, cur_masks, prev_masks, p)
    chosen = resolve_backend(backend, "ago_grouped", [*B_curs, *B_prevs])
    return chosen.ago_grouped(list(B_curs), list(B_prevs), list(cur_masks), list(prev_masks), p)
