"""Hugging Face Trainer: a transformers CLIPModel with pools on q/k/v/out_proj and fc1/fc2 of both towers, one
Trainer.train() per task; a TrainerCallback runs begin_task/end_task and compute_loss adds the AGO term. After the
last task the model is plain again and save_pretrained writes an ordinary CLIP checkpoint.

    python examples/hf_trainer.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from transformers import CLIPConfig, CLIPModel, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _toy_tasks import toy_tasks  # noqa: E402

from rank1_kernels import inject, mark_only_pool_trainable, unload  # noqa: E402
from rank1_kernels.integrations import hooks  # noqa: E402


def tiny_clip_config() -> CLIPConfig:
    """Random-init sizes for a CPU (in a real script: CLIPModel.from_pretrained("openai/clip-vit-base-patch16"))."""
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=12, bos_token_id=98, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


class TaskDataset(torch.utils.data.Dataset):
    """Each item pairs an image with its class caption, so CLIPModel(return_loss=True) trains image-text matching."""

    def __init__(self, task) -> None:
        self.task = task

    def __len__(self) -> int:
        return len(self.task.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.task.images[index], "input_ids": self.task.captions[self.task.labels[index]]}


# --- the recipe ---
class PoolLifecycleCallback(TrainerCallback):
    """One Trainer.train() per task: fresh pools when it starts, the top_m experts merged when it ends."""

    def __init__(self, task_id, top_m: int = 4, ago_weight: float = 0.1) -> None:
        self.task_id, self.top_m, self.ago_weight = task_id, top_m, ago_weight

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        hooks.begin_task(model, self.task_id, top_m=self.top_m, ago_weight=self.ago_weight)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        hooks.end_task(model)


class PoolTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        inputs = {**inputs, "return_loss": True}  # CLIPModel's contrastive loss
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        loss = loss + hooks.loss_extra(model)
        return (loss, outputs) if return_outputs else loss


# --- end of the recipe ---


def run(output_dir: str, n_tasks: int = 2, steps_per_task: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config())
    inject(model)  # q/k/v/out_proj, fc1, fc2 of both towers
    mark_only_pool_trainable(model)
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=8, max_steps=steps_per_task, learning_rate=2e-3,
        weight_decay=1e-2, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, seed=seed,
    )  # fmt: skip
    for task_id, task in enumerate(toy_tasks(n_tasks=n_tasks, seed=seed)):
        trainer = PoolTrainer(
            model=model, args=args, train_dataset=TaskDataset(task), callbacks=[PoolLifecycleCallback(task_id)]
        )
        trainer.train()
    unload(model)
    model.save_pretrained(os.path.join(output_dir, "clip_after_all_tasks"))
    return {"model": model, "lifecycle": hooks.lifecycle_of(model)}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        result = run(directory)
        reloaded = CLIPModel.from_pretrained(os.path.join(directory, "clip_after_all_tasks"))
    print("tasks merged:", result["lifecycle"].finished_tasks, "| reloaded as", type(reloaded).__name__)
