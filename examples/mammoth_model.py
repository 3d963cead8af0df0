"""Mammoth: the pool life cycle as a Mammoth model (Rank1PoolMixin on ContinualModel).

Mammoth is not on PyPI, so this script runs the model against a stand-in: a minimal ContinualModel with the
constructor, get_optimizer and meta_begin_task / meta_observe / meta_end_task wrappers of Mammoth's
models/utils/continual_model.py, and a loop that calls them in the order Mammoth's training loop does. In a Mammoth
checkout, the class Rank1Pool below goes into models/rank1_pool.py with ContinualModel imported from
models.utils.continual_model instead, and runs as `python main.py --model rank1_pool --dataset ... --lr 2e-3`.

    python examples/mammoth_model.py
"""

from __future__ import annotations

from argparse import ArgumentParser

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from rank1_kernels.integrations.mammoth import Rank1PoolMixin, add_rank1_pool_args


class StandInContinualModel(nn.Module):
    """Stand-in for mammoth's ContinualModel: what Rank1PoolMixin relies on, with the same names and signatures."""

    NAME: str
    COMPATIBILITY: list

    @staticmethod
    def get_parser() -> ArgumentParser:
        parser = ArgumentParser(description="Base CL model")
        parser.add_argument("--lr", type=float, default=2e-3)
        parser.add_argument("--optim_wd", type=float, default=1e-2)
        return parser

    def __init__(self, backbone: nn.Module, loss: nn.Module, args, transform, dataset=None) -> None:
        super().__init__()
        self.net, self.loss, self.args, self.transform = backbone, loss, args, transform
        self._current_task = 0
        self.opt = self.get_optimizer()

    @property
    def current_task(self) -> int:
        return self._current_task

    def get_parameters(self):
        return self.net.parameters()

    def get_optimizer(self):
        return torch.optim.AdamW(self.get_parameters(), lr=self.args.lr, weight_decay=self.args.optim_wd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def meta_begin_task(self, dataset) -> None:
        self.begin_task(dataset)

    def meta_observe(self, *args, **kwargs) -> float:
        return self.observe(*args, **kwargs)

    def meta_end_task(self, dataset) -> None:
        self.end_task(dataset)
        self._current_task += 1


ContinualModel = StandInContinualModel  # in Mammoth: from models.utils.continual_model import ContinualModel


# --- the recipe (models/rank1_pool.py in a Mammoth checkout) ---
class Rank1Pool(Rank1PoolMixin, ContinualModel):
    NAME = "rank1_pool"
    COMPATIBILITY = ["class-il", "domain-il", "task-il", "general-continual"]

    @staticmethod
    def get_parser(parser=None) -> ArgumentParser:
        return add_rank1_pool_args(parser if parser is not None else ContinualModel.get_parser())


# --- end of the recipe ---


def toy_task_loaders(n_tasks: int = 2, classes_per_task: int = 2, per_class: int = 16, size: int = 16, seed: int = 0):
    """Per task, a list of (inputs, labels, not_aug_inputs) batches as Mammoth's loaders give them."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(n_tasks * classes_per_task, 3, size, size, generator=generator)
    tasks = []
    for task in range(n_tasks):
        labels = torch.arange(task * classes_per_task, (task + 1) * classes_per_task).repeat_interleave(per_class)
        images = patterns[labels] + 0.5 * torch.randn(len(labels), 3, size, size, generator=generator)
        order = torch.randperm(len(labels), generator=generator)
        images, labels = images[order], labels[order]
        tasks.append([(images[i : i + 16], labels[i : i + 16], images[i : i + 16]) for i in range(0, len(labels), 16)])
    return tasks


def run(n_tasks: int = 2, epochs: int = 1, argv: list[str] | None = None, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    args = Rank1Pool.get_parser().parse_args(
        argv if argv is not None else ["--pool_r", "6", "--pool_k", "3", "--pool_top_m", "2"]
    )
    backbone = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=2 * n_tasks)
    model = Rank1Pool(backbone, nn.CrossEntropyLoss(), args, transform=None)
    losses = []
    for task_loader in toy_task_loaders(n_tasks=n_tasks, seed=seed):  # Mammoth's train(): the same calls in order
        model.meta_begin_task(task_loader)
        for epoch in range(epochs):
            for inputs, labels, not_aug_inputs in task_loader:
                losses.append((model.current_task, model.meta_observe(inputs, labels, not_aug_inputs, epoch=epoch)))
        model.meta_end_task(task_loader)
    return {"model": model, "losses": losses}


if __name__ == "__main__":
    result = run()
    print(
        "tasks merged:", result["model"].pool_lifecycle.finished_tasks, "| last loss", round(result["losses"][-1][1], 4)
    )
