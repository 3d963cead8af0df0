"""The training loss: a label-aware symmetric image-text contrastive loss (one caption per image, the task's
template filled with the image's class name)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_aware_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """image_features, text_features: (B, D), L2-normalised, text i the caption of image i; labels: (B,) int.

    logits = logit_scale * image_features @ text_features^T. Every caption of an image's class is a positive
    (label-aware: two images of one class in a batch are not pushed apart), so the target of row i is uniform
    over {j : labels[j] == labels[i]}. Returns the mean of the image->text and text->image cross-entropies."""
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} must both "
            f"be (batch, dim)"
        )
    if labels.shape != (image_features.shape[0],):
        raise ValueError(f"labels {tuple(labels.shape)} must be ({image_features.shape[0]},), one per image")
    same_class = labels[:, None] == labels[None, :]
    targets = same_class.to(image_features.dtype) / same_class.sum(dim=1, keepdim=True).to(image_features.dtype)
    logits = logit_scale * image_features @ text_features.t()
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    # same_class is symmetric, so the text->image targets are the same matrix.
    text_to_image = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2
