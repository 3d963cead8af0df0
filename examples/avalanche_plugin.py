"""Avalanche: a timm ViT with pools, trained by Avalanche's Naive strategy over a class-incremental stream; the
Rank1PoolPlugin gives each experience fresh pools, adds the AGO term before backward and merges after it.

    python examples/avalanche_plugin.py
"""

from __future__ import annotations

import torch
from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive
from timm.models.vision_transformer import VisionTransformer

from rank1_kernels import inject, mark_only_pool_trainable
from rank1_kernels.integrations.avalanche import Rank1PoolPlugin


class ToyImages(torch.utils.data.TensorDataset):
    """Tiny images whose class shows in a per-class mean pattern; Avalanche reads `.targets`."""

    def __init__(self, n_classes: int = 4, per_class: int = 16, size: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        patterns = torch.randn(n_classes, 3, size, size, generator=torch.Generator().manual_seed(1234))
        labels = torch.arange(n_classes).repeat_interleave(per_class)
        images = patterns[labels] + 0.5 * torch.randn(len(labels), 3, size, size, generator=generator)
        super().__init__(images, labels)
        self.targets = labels.tolist()


def run(n_experiences: int = 2, epochs: int = 1, other_plugins=(), seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=4)
    benchmark = nc_benchmark(
        ToyImages(seed=seed), ToyImages(seed=seed + 1), n_experiences=n_experiences, task_labels=False, seed=seed,
        fixed_class_order=list(range(4)),
    )  # fmt: skip

    # --- the recipe ---
    inject(model, r=6, k=3)  # qkv (one pool per q, k, v), proj, fc1, fc2 of every block
    mark_only_pool_trainable(model)
    model.head.requires_grad_(True)  # this toy classifier has no text tower: its head trains beside the pools
    pool_plugin = Rank1PoolPlugin(top_m=2, ago_weight=0.1)
    strategy = Naive(
        model=model, optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=epochs, eval_mb_size=32, device="cpu",
        plugins=[pool_plugin, *other_plugins], evaluator=EvaluationPlugin(loggers=[]),
    )  # fmt: skip
    for experience in benchmark.train_stream:
        strategy.train(experience)
    checkpoint = {
        "model": model.state_dict(),
        "pool_lifecycle": pool_plugin.state_dict(),
    }  # torch.save(checkpoint, path)
    # --- end of the recipe ---
    return {"model": model, "plugin": pool_plugin, "strategy": strategy, "checkpoint": checkpoint}


if __name__ == "__main__":
    result = run()
    print("experiences merged:", result["plugin"].lifecycle.finished_tasks)
