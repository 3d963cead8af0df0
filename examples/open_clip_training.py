"""open_clip training script: the pool life cycle through the function hooks (rank1_kernels.integrations.hooks),
the way a script built around open_clip's train_one_epoch adds it: begin_task before the epochs, loss_extra beside
the contrastive loss, end_task after; the checkpoint keeps the continual history next to the state_dict.

    python examples/open_clip_training.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _toy_tasks import clip_task_loss, toy_tasks  # noqa: E402

from rank1_kernels import inject, mark_only_pool_trainable  # noqa: E402
from rank1_kernels.integrations import hooks  # noqa: E402


def tiny_open_clip():
    """A random-init open_clip CLIP small enough for a CPU (in a real script: open_clip.create_model_and_transforms)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=12, vocab_size=100, width=32, heads=4, layers=2),
    )


def run(checkpoint_path: str, n_tasks: int = 2, steps_per_task: int = 4, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = tiny_open_clip()
    tasks = toy_tasks(n_tasks=n_tasks, seed=seed)

    # --- the recipe ---
    inject(model, towers=("vision", "text"), text_routing="eot")  # the defaults, spelled out
    mark_only_pool_trainable(model)
    for task_id, task in enumerate(tasks):
        hooks.begin_task(model, task_id, top_m=4, ago_weight=0.1)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=1e-2)
        for step in range(steps_per_task):  # open_clip: train_one_epoch(...)
            for images, labels in task.batches(batch_size=8):
                image_features, text_features, logit_scale = model(images, task.captions)
                loss = clip_task_loss(image_features, text_features, labels, logit_scale) + hooks.loss_extra(model)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        hooks.end_task(model)
        torch.save({"state_dict": model.state_dict(), "pool_lifecycle": hooks.state_dict(model)}, checkpoint_path)
    # --- end of the recipe ---
    return {"model": model}


def resume(checkpoint_path: str):
    """Rebuild the model, inject it the same way, and load both parts of the checkpoint."""
    model = inject(tiny_open_clip())
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    hooks.load_state_dict(model, checkpoint["pool_lifecycle"])
    return model


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "checkpoint.pt")
        run(path)
        resumed = resume(path)
    print("tasks finished before the checkpoint:", hooks.lifecycle_of(resumed).finished_tasks)
