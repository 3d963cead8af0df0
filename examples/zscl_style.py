"""ZSCL-style script (OpenAI clip layout, as in ZSCL, MoE-Adapters4CL, DIKI and the paper's code): pools in every
block of both towers, trained task by task with the AGO term, merged after each task, and saved at the end as a
plain CLIP checkpoint that the codebase's own loading code reads.

    python examples/zscl_style.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _toy_tasks import clip_task_loss, toy_tasks  # noqa: E402
from openai_clip_layout import CLIP  # noqa: E402

from rank1_kernels import PoolLifecycle, inject, mark_only_pool_trainable, unload  # noqa: E402


def run(checkpoint_path: str, n_tasks: int = 2, steps_per_task: int = 4, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = CLIP()  # in ZSCL: model, _, _ = clip.load("ViT-B/16", jit=False)
    tasks = toy_tasks(n_tasks=n_tasks, seed=seed)

    # --- the recipe ---
    inject(model, r=12, k=8)  # both towers; text layers route on the end-of-text token
    mark_only_pool_trainable(model)
    lifecycle = PoolLifecycle(model, top_m=4, ago_weight=0.1)
    losses = []
    for task_id, task in enumerate(tasks):
        lifecycle.begin_task(task_id)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=1e-2)
        for step in range(steps_per_task):
            for images, labels in task.batches(batch_size=8):
                task_loss = clip_task_loss(
                    model.encode_image(images), model.encode_text(task.captions), labels, model.logit_scale.exp()
                )
                loss = task_loss + lifecycle.loss_extra()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append((task_id, task_loss.item(), (loss - task_loss).item()))
        lifecycle.end_task()
    unload(model)  # plain nn.MultiheadAttention / nn.Linear again, the merged weights in them
    torch.save(model.state_dict(), checkpoint_path)
    # --- end of the recipe ---
    return {"model": model, "losses": losses, "history": lifecycle.state_dict()}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        result = run(os.path.join(directory, "clip_after_all_tasks.pt"))
    for task_id, task_loss, ago in result["losses"][:: max(1, len(result["losses"]) // 8)]:
        print(f"task {task_id}: task loss {task_loss:.4f}, AGO term {ago:.5f}")
    print(
        "merged experts per task (first layer):",
        next(iter(result["history"]["merged_experts_per_task"].values())).tolist(),
    )
