"""peft: the pool layer through get_peft_model with a LoraConfig whose custom module mapping builds pool layers;
PoolLifecycle runs on the peft model, and merge_and_unload returns the plain model with the merged weights.

    python examples/peft_bridge.py
"""

from __future__ import annotations

import os
import sys

import torch
from peft import get_peft_model
from transformers import CLIPModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _toy_tasks import toy_tasks  # noqa: E402
from hf_trainer import tiny_clip_config  # noqa: E402

from rank1_kernels import PoolLifecycle  # noqa: E402
from rank1_kernels.families import set_text_routing  # noqa: E402
from rank1_kernels.integrations.peft_bridge import rank1_pool_lora_config  # noqa: E402


def run(n_tasks: int = 2, steps_per_task: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config())

    # --- the recipe ---
    config = rank1_pool_lora_config(
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], r=12, lora_alpha=1.0, k=8, top_m=4
    )
    model = get_peft_model(model, config)
    set_text_routing(model, "eot")  # text layers route on the end-of-text token, as inject() sets up
    lifecycle = PoolLifecycle(model, top_m=4, ago_weight=0.1)
    for task_id, task in enumerate(toy_tasks(n_tasks=n_tasks, seed=seed)):
        lifecycle.begin_task(task_id)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        for _ in range(steps_per_task):
            out = model(input_ids=task.captions[task.labels], pixel_values=task.images, return_loss=True)
            loss = out.loss + lifecycle.loss_extra()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        lifecycle.end_task()  # merges into the base weights, as merge_and_unload would
    plain = model.merge_and_unload()  # nothing left to merge after end_task: the pools restart empty
    # --- end of the recipe ---
    return {"model": plain, "lifecycle": lifecycle}


if __name__ == "__main__":
    result = run()
    print("tasks merged:", result["lifecycle"].finished_tasks, "| plain model:", type(result["model"]).__name__)
