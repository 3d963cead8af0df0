"""The CPU demo: a tiny CLIP, made useful by a short contrastive pre-training on a separate slice of the synthetic
domains, then the continual sequence (shapes -> colors -> textures -> digits -> satellite) three ways on the same
data: the rank-1 expert pool + AGO (the paper), a dense LoRA of the same rank, and sequential full fine-tuning.

    python -m rank1_cl demo [--run-dir runs/demo] [--iterations 60] [--shots 5]

Writes <run_dir>/pretrained/ (the tiny CLIP, loaded back through open_clip's checkpoint path), one run directory
per method (results.json, accuracy_*.csv, accuracy_*.png, checkpoints/) and summary.json / summary.csv.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time

import torch

from rank1_kernels.adapters import atomic_write

from .config import CLConfig, apply_overrides
from .data import SYNTHETIC_DOMAINS, synthetic_split, synthetic_tasks
from .losses import label_aware_contrastive_loss
from .metrics import format_matrix, summarize
from .model import TINY_MODEL, create_clip
from .trainer import clear_run_directory, run_continual, seed_everything

logger = logging.getLogger("rank1_cl")

METHOD_TITLES = {
    "pool": "rank-1 expert pool + AGO (paper)",
    "lora": "dense LoRA, same rank",
    "full": "sequential full fine-tuning",
}
# Per-method learning rates: the paper's 2e-3 for the adapters; full fine-tuning of every weight needs a smaller one.
METHOD_LR = {"pool": 2e-3, "lora": 2e-3, "full": 1e-4}


def pretrain_tiny_clip(path: str, seed: int, steps: int, per_class: int = 8, batch_size: int = 64, lr: float = 1e-3,
                       progress: bool = True) -> dict:  # fmt: skip
    """Train the tiny CLIP from scratch with the contrastive loss on `per_class` images per class of every synthetic
    domain (a random stream disjoint from the tasks' train and test images), captioned with a generic template;
    save it to `path` (safetensors). Returns {"seconds", "final_loss"}."""
    config = CLConfig()
    apply_overrides(config, {"model.name": TINY_MODEL})
    seed_everything(seed)
    model, _, _, tokenizer = create_clip(config.model, seed=seed)
    images, labels, captions = [], [], []
    for position, (name, domain) in enumerate(SYNTHETIC_DOMAINS.items()):
        split = synthetic_split(name, per_class, seed=10_000 + 97 * seed + position)
        images.append(torch.stack([split[index][0] for index in range(len(split))]))
        labels.append(split.labels + len(captions))
        captions += [f"a photo of {class_name}." for class_name in domain.class_names]
    images, labels, tokens = torch.cat(images), torch.cat(labels), tokenizer(captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 15)
    started = time.perf_counter()
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="pre-training the tiny CLIP", leave=False, dynamic_ncols=True)
    loss = torch.zeros(())
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = torch.randint(len(labels), (batch_size,), generator=generator)
        image_features, text_features, logit_scale = model(images[batch], tokens[labels[batch]])
        loss = label_aware_contrastive_loss(image_features, text_features, labels[batch], logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    from safetensors.torch import save_file

    tensors = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    atomic_write(path, lambda temporary: save_file(tensors, temporary))
    return {"seconds": time.perf_counter() - started, "final_loss": float(loss.detach())}


def demo_config(method: str, run_dir: str, pretrained: str, iterations: int, shots: int, seed: int,
                test_per_class: int, domains=None) -> CLConfig:  # fmt: skip
    config = CLConfig()
    apply_overrides(
        config,
        {
            "model.name": TINY_MODEL, "model.pretrained": pretrained, "data.benchmark": "synthetic",
            "data.synthetic_test_per_class": test_per_class, "train.method": method, "train.iterations": iterations,
            "train.shots": shots, "train.seed": seed, "train.lr": METHOD_LR[method],
            "run.run_dir": os.path.join(run_dir, method), "train.log_every": 10**9, "data.tasks": domains,
        },
    )  # fmt: skip
    return config.validate()


def summary_table(rows: list) -> str:
    header = (
        f"{'method':<36}{'trainable':>12}{'ms/step':>9}   {'MTIL Transfer':>13}{'Avg':>6}{'Last':>6}"
        f"   {'X-TAIL Transfer':>15}{'Avg':>6}{'Last':>6}"
    )
    lines = [header, "-" * len(header)]

    def percent(value):
        return "  n/a" if value is None else f"{100 * value:5.1f}"

    for row in rows:
        mtil, xtail = row["mtil"], row["xtail"]
        lines.append(
            f"{METHOD_TITLES[row['method']]:<36}{row['trainable_parameters']:>12,}{1000 * row['seconds_per_step']:>9.1f}"
            f"   {percent(mtil['transfer']):>13}{percent(mtil['avg']):>6}{percent(mtil['last']):>6}"
            f"   {percent(xtail['transfer']):>15}{percent(xtail['avg']):>6}{percent(xtail['last']):>6}"
        )
    return "\n".join(lines)


def run_demo(run_dir: str = "runs/demo", iterations: int = 60, shots: int = 5, seed: int = 0, pretrain_steps: int = 300,
             methods=("pool", "lora", "full"), test_per_class: int = 40, progress: bool = True, echo=print,
             domains=None) -> dict:  # fmt: skip
    """The whole demo; returns the summary (also written to <run_dir>/summary.json and summary.csv).
    domains: a subset of the synthetic domains, in order (default: all five; the pre-training always sees all)."""
    started = time.perf_counter()
    methods = list(methods)
    repeated = sorted({method for method in methods if methods.count(method) > 1})
    if repeated or not methods:
        raise ValueError(f"methods {methods}: expected each of pool, lora, full at most once, and at least one")
    if pretrain_steps < 1:
        raise ValueError(f"pretrain_steps={pretrain_steps}: expected at least 1 pre-training step")
    pretrained = os.path.join(run_dir, "pretrained", f"{TINY_MODEL}.safetensors")
    # Every method's settings are checked before minutes of pre-training, not after.
    configs = [demo_config(m, run_dir, pretrained, iterations, shots, seed, test_per_class, domains) for m in methods]
    os.makedirs(run_dir, exist_ok=True)
    echo(f"[1/2] pre-training a tiny CLIP ({pretrain_steps} steps) on a separate slice of the synthetic domains")
    pretraining = pretrain_tiny_clip(pretrained, seed, pretrain_steps, progress=progress)
    echo(f"      done in {pretraining['seconds']:.0f} s (loss {pretraining['final_loss']:.3f}); saved to {pretrained}")
    task_names = [task.name for task in synthetic_tasks(domains, train_per_class=1, test_per_class=1, seed=seed)]
    echo(f"[2/2] continual sequence {' -> '.join(task_names)}: {iterations} iterations per task, {shots}-shot")
    rows = []
    for method, config in zip(methods, configs):
        clear_run_directory(config.run.run_dir)
        output = run_continual(config, progress=progress)
        results = output.results
        matrix = results["matrices"]["mtil"]
        zero_shot = results["zero_shot"]["mtil"]
        echo("")
        echo(f"== {METHOD_TITLES[method]} ({method}) ==")
        echo("zero-shot before training: " + "  ".join(f"{n} {100 * a:.1f}" for n, a in zip(task_names, zero_shot)))
        echo(format_matrix(matrix, task_names, "MTIL accuracy (%): row = after training on, column = evaluated on"))
        echo(format_matrix(results["matrices"]["xtail"], task_names, "X-TAIL accuracy (%): over all domains' classes"))
        rows.append({
            "method": method, "trainable_parameters": results["trainable_parameters"],
            "seconds_per_step": sum(results["seconds_per_step"]) / len(results["seconds_per_step"]),
            "mtil": summarize(matrix), "xtail": summarize(results["matrices"]["xtail"]),
            "zero_shot_mtil": zero_shot, "run_dir": config.run.run_dir,
        })  # fmt: skip
    echo("")
    echo(summary_table(rows))
    summary = {"tasks": task_names, "iterations": iterations, "shots": shots, "seed": seed, "methods": rows,
               "pretraining": pretraining, "seconds": time.perf_counter() - started}  # fmt: skip
    _write_summary(run_dir, summary)
    echo(f"\nresults under {run_dir}/ (summary.json, summary.csv, <method>/results.json, accuracy_*.csv, accuracy_*.png); "
         f"total {summary['seconds']:.0f} s")  # fmt: skip
    return summary


def _write_summary(run_dir: str, summary: dict) -> None:
    def write_json(temporary):
        with open(temporary, "w") as handle:
            json.dump(summary, handle, indent=2)

    atomic_write(os.path.join(run_dir, "summary.json"), write_json)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "trainable_parameters", "ms_per_step", "mtil_transfer", "mtil_avg", "mtil_last",
                     "xtail_transfer", "xtail_avg", "xtail_last"])  # fmt: skip
    for row in summary["methods"]:
        writer.writerow([
            row["method"], row["trainable_parameters"], f"{1000 * row['seconds_per_step']:.2f}",
            *(f"{v:.4f}" if v is not None else "" for v in (row["mtil"]["transfer"], row["mtil"]["avg"], row["mtil"]["last"])),
            *(f"{v:.4f}" if v is not None else "" for v in (row["xtail"]["transfer"], row["xtail"]["avg"], row["xtail"]["last"])),
        ])  # fmt: skip

    def write_csv(temporary):
        with open(temporary, "w") as handle:
            handle.write(buffer.getvalue())

    atomic_write(os.path.join(run_dir, "summary.csv"), write_csv)
