"""Toy continual-learning data for the examples: tiny images whose class shows in their mean colour pattern, and one
caption (token ids) per class, split into tasks of disjoint classes. Runs in milliseconds on a CPU."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class ImageTextTask:
    images: torch.Tensor  # (n, 3, size, size)
    labels: torch.Tensor  # (n,) int64, indices into captions
    captions: torch.Tensor  # (n_classes_in_task, context_length) token ids, end-of-text = the largest id of a row

    def batches(self, batch_size: int):
        for start in range(0, len(self.labels), batch_size):
            yield self.images[start : start + batch_size], self.labels[start : start + batch_size]


def toy_tasks(
    n_tasks: int = 2,
    classes_per_task: int = 2,
    samples_per_class: int = 8,
    image_size: int = 32,
    context_length: int = 12,
    vocab_size: int = 100,
    seed: int = 0,
) -> list[ImageTextTask]:
    generator = torch.Generator().manual_seed(seed)
    n_classes = n_tasks * classes_per_task
    patterns = torch.randn(n_classes, 3, image_size, image_size, generator=generator)
    captions = torch.zeros(n_classes, context_length, dtype=torch.int64)
    for label in range(n_classes):
        length = 2 + label % (context_length - 3)
        captions[label, 0] = vocab_size - 2  # start of text
        captions[label, 1:length] = torch.randint(1, vocab_size - 2, (length - 1,), generator=generator)
        captions[label, length] = vocab_size - 1  # end of text
    tasks = []
    for task in range(n_tasks):
        classes = torch.arange(task * classes_per_task, (task + 1) * classes_per_task)
        labels = classes.repeat_interleave(samples_per_class)
        images = patterns[labels] + 0.5 * torch.randn(len(labels), 3, image_size, image_size, generator=generator)
        order = torch.randperm(len(labels), generator=generator)
        tasks.append(ImageTextTask(images[order], labels[order] - task * classes_per_task, captions[classes]))
    return tasks


def clip_task_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, logit_scale
) -> torch.Tensor:
    """Cross-entropy of each image over its task's class captions (CLIP's zero-shot head, trained).

    image_features: (n, d), text_features: (n_classes, d), labels: (n,)."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    return F.cross_entropy(logit_scale * image_features @ text_features.t(), labels)
