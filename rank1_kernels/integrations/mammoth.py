"""A Mammoth-style continual model: the pool life cycle in Mammoth's ContinualModel hooks.

Mammoth (aimagelab/mammoth) is not on PyPI and is used from a checkout; a model is a file in its models/ folder.
Put this there as models/rank1_pool.py (the class name must be the file name in CamelCase):

    from models.utils.continual_model import ContinualModel
    from rank1_kernels.integrations.mammoth import Rank1PoolMixin, add_rank1_pool_args

    class Rank1Pool(Rank1PoolMixin, ContinualModel):
        NAME = "rank1_pool"
        COMPATIBILITY = ["class-il", "domain-il", "task-il", "general-continual"]

        @staticmethod
        def get_parser(parser=None):
            return add_rank1_pool_args(parser if parser is not None else ContinualModel.get_parser())

Rank1PoolMixin injects pool layers into the backbone before ContinualModel builds its optimizer (only the pools
train), and implements begin_task(dataset) (fresh pools), observe(inputs, labels, not_aug_inputs, epoch) (task loss
+ AGO, one optimizer step) and end_task(dataset) (merge the top_m experts). Mammoth's meta_* wrappers keep calling
them and count the tasks. This module imports nothing from Mammoth.
"""

from __future__ import annotations

import fnmatch
from argparse import ArgumentParser

import torch
import torch.nn as nn

from ..inject import inject, mark_only_pool_trainable, pool_layers
from ..lifecycle import PoolLifecycle


def add_rank1_pool_args(parser: ArgumentParser) -> ArgumentParser:
    """The pool's command-line options, all prefixed --pool_ (Mammoth models extend the parser this way)."""
    parser.add_argument(
        "--pool_target", type=str, default="auto",
        help="inject() target: 'auto' (the model family's defaults; for a ViT shaped like timm's, as Mammoth's own "
             "backbone/vit.py, its attn.qkv, attn.proj, mlp.fc1, mlp.fc2) or comma-separated patterns",
    )  # fmt: skip
    parser.add_argument(
        "--pool_train_modules", type=str, default="head",
        help="comma-separated module-name patterns whose parameters train too (default: the classifier head, which "
             "class-IL must learn); '' for the pools alone",
    )  # fmt: skip
    parser.add_argument("--pool_r", type=int, default=12, help="rank-1 experts per layer")
    parser.add_argument("--pool_k", type=int, default=8, help="experts chosen per sample")
    parser.add_argument("--pool_alpha", type=float, default=1.0, help="LoRA alpha (scaling alpha / r)")
    parser.add_argument("--pool_routing", type=str, default="sample", choices=("sample", "batch"))
    parser.add_argument("--pool_gate", type=str, default="none", choices=("none", "softmax", "sigmoid"))
    parser.add_argument("--pool_dropout", type=float, default=0.0)
    parser.add_argument("--pool_top_m", type=int, default=4, help="experts merged at the end of each task")
    parser.add_argument(
        "--pool_ago_weight", type=float, default=0.1, help="weight of the AGO loss (tasks after the first)"
    )
    return parser


# The Linear layers of a ViT built like timm's, whatever its class (Mammoth's backbone/vit.py is its own copy).
VIT_BLOCK_TARGETS = ("*.attn.qkv", "*.attn.proj", "*.mlp.fc1", "*.mlp.fc2")


def _inject_backbone(backbone: nn.Module, args) -> None:
    if any(True for _ in pool_layers(backbone)):
        return  # injected by the caller, with its own settings
    settings = dict(r=args.pool_r, k=args.pool_k, alpha=args.pool_alpha, routing=args.pool_routing,
                    gate=args.pool_gate, dropout=args.pool_dropout)  # fmt: skip
    if args.pool_target != "auto":
        inject(backbone, target=tuple(args.pool_target.split(",")), **settings)
        return
    names = [name for name, _ in backbone.named_modules()]
    vit_shaped = all(any(fnmatch.fnmatchcase(name, pattern) for name in names) for pattern in VIT_BLOCK_TARGETS)
    try:
        inject(backbone, target="auto", **settings)
    except ValueError:
        if not vit_shaped:
            raise
        inject(backbone, target=VIT_BLOCK_TARGETS, **settings)


def _train_modules_too(backbone: nn.Module, patterns: str) -> None:
    for pattern in filter(None, (p.strip() for p in patterns.split(","))):
        matched = [module for name, module in backbone.named_modules() if name and fnmatch.fnmatchcase(name, pattern)]
        for module in matched:
            module.requires_grad_(True)


class Rank1PoolMixin:
    """Put before ContinualModel in the bases. Needs the --pool_* arguments of add_rank1_pool_args in args."""

    def __init__(self, backbone: nn.Module, loss: nn.Module, args, transform, *more, **kwargs) -> None:
        _inject_backbone(backbone, args)
        mark_only_pool_trainable(backbone)
        _train_modules_too(backbone, getattr(args, "pool_train_modules", ""))
        super().__init__(backbone, loss, args, transform, *more, **kwargs)
        self.pool_lifecycle = PoolLifecycle(self.net, top_m=args.pool_top_m, ago_weight=args.pool_ago_weight)

    def get_parameters(self):
        """Only the pools train (ContinualModel.get_optimizer builds the optimizer over these)."""
        return [parameter for parameter in self.net.parameters() if parameter.requires_grad]

    def begin_task(self, dataset) -> None:
        self.pool_lifecycle.begin_task(self.current_task)
        self.opt = self.get_optimizer()  # fresh optimizer state for the fresh pools

    def observe(
        self, inputs: torch.Tensor, labels: torch.Tensor, not_aug_inputs: torch.Tensor, epoch: int | None = None
    ) -> float:
        self.opt.zero_grad()
        loss = self.loss(self.net(inputs), labels) + self.pool_lifecycle.loss_extra()
        loss.backward()
        self.opt.step()
        return loss.item()

    def end_task(self, dataset) -> None:
        self.pool_lifecycle.end_task()

    def pool_state_dict(self) -> dict:
        """The continual history beyond the network's own state_dict (save both)."""
        return self.pool_lifecycle.state_dict()

    def load_pool_state_dict(self, state: dict) -> None:
        self.pool_lifecycle.load_state_dict(state)
