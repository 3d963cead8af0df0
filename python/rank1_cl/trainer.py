"""The continual-learning protocol, as the paper's code runs it.

For each task in order: a fresh pool (begin_task), few-shot sampling (train.shots per class), train.iterations
steps of batch train.batch_size with AdamW and cosine decay (lr -> min_lr), loss = label-aware symmetric
image-text contrastive loss (the task's one training template) + ago_weight * AGO (none on the first task);
then the top merge_top_m experts of each layer are merged into its weight (end_task). After each task every
task's test set is classified zero-shot (its own class names, the template ensemble: MTIL) and over the union of
all tasks' class names (X-TAIL). Methods "lora" (dense LoRA) and "full" (sequential fine-tuning) run the same
loop.

    output = run_continual(config)            # output.results: matrices, metrics, timings; output.model
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from rank1_kernels import PoolLifecycle

from . import checkpoint as checkpoints
from .config import CLConfig
from .data import Task, few_shot_indices, mtil_tasks, random_subset, synthetic_tasks, xtail_order
from .distributed import (
    DistContext,
    activation_counts_snapshot,
    all_reduce_sum,
    barrier,
    gather_with_local_grad,
    init_distributed,
    scale_gradient,
    synchronize_activation_counts,
    wrap_model,
)
from .losses import label_aware_contrastive_loss
from .metrics import format_matrix, summarize, write_results
from .model import create_clip, merge_count, pool_config, prepare_method

logger = logging.getLogger("rank1_cl")


@dataclasses.dataclass
class RunOutput:
    results: dict
    model: nn.Module
    is_main: bool = True  # rank 0 (the process that wrote the files)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_size_of(model: nn.Module) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def build_tasks(config: CLConfig, model: nn.Module, preprocess_train, preprocess_val) -> list:
    if config.data.benchmark == "synthetic":
        return synthetic_tasks(
            config.data.tasks, config.data.synthetic_train_per_class, config.data.synthetic_test_per_class,
            seed=config.train.seed, image_size=image_size_of(model),
        )  # fmt: skip
    train_transform = preprocess_train if config.data.train_augment else preprocess_val
    names = config.data.tasks
    if names is None and config.data.benchmark == "xtail":
        names = xtail_order(config.data.order)
    return mtil_tasks(config.data.data_root, names, config.data.order, train_transform, preprocess_val)


def encode_pair(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    """(image_features, text_features, logit_scale) from an open_clip model's forward (tuple or dict output)."""
    output = model(images, tokens)
    if isinstance(output, dict):
        return output["image_features"], output["text_features"], output["logit_scale"]
    return output[0], output[1], output[2]


def _loader(dataset, batches: Sequence[Sequence[int]], num_workers: int, seed: int) -> DataLoader:
    # A generator of its own: a DataLoader otherwise draws its worker seed from the global RNG, which would
    # make the global random stream depend on how the data was loaded.
    return DataLoader(
        dataset, batch_sampler=[list(batch) for batch in batches], num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * step / total))


def global_batches(indices: torch.Tensor, batch_size: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """(iterations, batch_size) sample indices: successive random permutations of `indices`, cut into batches."""
    needed = iterations * batch_size
    permutations = [
        indices[torch.randperm(len(indices), generator=generator)] for _ in range(-(-needed // len(indices)))
    ]
    return torch.cat(permutations)[:needed].view(iterations, batch_size)


def global_batch_loss(image_features, text_features, labels, logit_scale, context: DistContext):
    """The contrastive loss over the global batch, ready for backward under DDP; returns (loss, its value).

    image_features, text_features: this rank's (B / world_size, D) rows; labels: the global batch's (B,).
    Every rank gathers all rows (only its own carry gradient), so its gradient is its rows' share of the global
    loss's; DDP averages the ranks' gradients, hence the factor world_size: the sum of the shares is the
    gradient of one process on the global batch."""
    image_features = gather_with_local_grad(image_features, context)
    text_features = gather_with_local_grad(text_features, context)
    if context.distributed:  # every rank's loss sees all of the batch through logit_scale: undo the factor for it
        logit_scale = scale_gradient(logit_scale, 1.0 / context.world_size)
    loss = label_aware_contrastive_loss(image_features, text_features, labels, logit_scale)
    return loss * context.world_size, float(loss.detach())


def train_task(
    model: nn.Module, train_model: nn.Module, task: Task, task_index: int, config: CLConfig, context: DistContext,
    lifecycle: Optional[PoolLifecycle], tokenizer, progress: bool = True,
) -> dict:  # fmt: skip
    """train.iterations optimizer steps on `task`; returns {"loss": the last step's loss, "seconds_per_step": the
    mean time of forward + backward + optimizer step (data loading excluded)}. The optimizer is the task's own (the
    next task starts a fresh one), so checkpoints do not keep its state.
    The data order is drawn from a generator seeded by (seed, task index), identical on every rank."""
    settings = config.train
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + task_index)
    pool = few_shot_indices(task.train_labels, settings.shots, generator)
    batches = global_batches(pool, settings.batch_size, settings.iterations, generator)
    local = context.local_slice(settings.batch_size)
    loader = _loader(task.train, batches[:, local].tolist(), config.data.num_workers, settings.seed + task_index)
    device, dtype = context.device, next(model.parameters()).dtype
    class_tokens = tokenizer([task.train_template.format(name) for name in task.class_names]).to(device)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    losses, step_seconds = [], []
    steps = _progress(loader, progress and context.is_main, f"{task.name} [{settings.method}]", settings.iterations)
    for step, (images, local_labels) in enumerate(steps):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.iterations, settings.lr, settings.min_lr)
        labels = task.train_labels[batches[step]].to(device)
        images, local_labels = images.to(device=device, dtype=dtype), local_labels.to(device)
        counts_before = activation_counts_snapshot(model) if context.distributed else None
        image_features, text_features, logit_scale = encode_pair(train_model, images, class_tokens[local_labels])
        if context.distributed:
            synchronize_activation_counts(model, counts_before, context)
        contrastive, contrastive_value = global_batch_loss(image_features, text_features, labels, logit_scale, context)
        extra = lifecycle.loss_extra() if lifecycle is not None else contrastive.new_zeros(())
        loss = contrastive + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them before reading the clock
        step_seconds.append(time.perf_counter() - started)
        losses.append(contrastive_value + float(extra.detach()))
        if hasattr(steps, "set_postfix") and (step % 10 == 0 or step == settings.iterations - 1):
            steps.set_postfix(loss=f"{losses[-1]:.3f}")
        if context.is_main and (step + 1) % settings.log_every == 0:
            logger.info("%s step %d/%d loss %.4f", task.name, step + 1, settings.iterations, losses[-1])
    # The first steps include one-time costs (allocations, lazy initialisation): time the rest.
    timed = step_seconds[min(2, len(step_seconds) - 1) :]
    return {"loss": losses[-1], "seconds_per_step": sum(timed) / len(timed)}


def _progress(iterable, enabled: bool, description: str, total: int):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)


@torch.no_grad()
def class_embeddings(model: nn.Module, tokenizer, classes: Sequence[tuple], device, batch_size: int) -> list:
    """classes: per group, (class names, templates). Per group (n_classes, D): per class, the normalised mean of its
    normalised template embeddings (the template ensemble). All prompts go through the text tower together, in
    chunks of batch_size."""
    prompts = [template.format(name) for names, templates in classes for name in names for template in templates]
    tokens = tokenizer(prompts).to(device)
    features = torch.cat([model.encode_text(chunk, normalize=True) for chunk in tokens.split(batch_size)])
    embeddings, start = [], 0
    for names, templates in classes:
        count = len(names) * len(templates)
        mean = features[start : start + count].view(len(names), len(templates), -1).mean(dim=1)
        embeddings.append(mean / mean.norm(dim=-1, keepdim=True))
        start += count
    return embeddings


@torch.no_grad()
def evaluate(model: nn.Module, tasks: Sequence[Task], tokenizer, config: CLConfig, context: DistContext) -> dict:
    """{"mtil": [accuracy per task], "xtail": [...]}: each test image classified over its own task's classes
    (its template ensemble), and (X-TAIL) over the union of every task's class names without the task id, each
    name through the one prompt eval.xtail_template (the X-TAIL protocol when the tasks are its 10 domains,
    --benchmark xtail). Test sets are split across ranks and the correct counts summed."""
    was_training = model.training
    model.eval()
    device, dtype = context.device, next(model.parameters()).dtype
    # A class name shared by two domains is one class of the union (RAIL's code keeps both rows, so a tie there
    # goes to the earlier domain; only images of shared names can score differently).
    union_names = list(dict.fromkeys(name for task in tasks for name in task.class_names))
    groups = [(task.class_names, task.templates) for task in tasks]
    if config.eval.x_tail:
        groups.append((union_names, [config.eval.xtail_template]))
    embeddings = class_embeddings(model, tokenizer, groups, device, config.eval.batch_size)
    union = embeddings.pop() if config.eval.x_tail else None
    union_index = {name: index for index, name in enumerate(union_names)}
    rows = {"mtil": [], "xtail": []}
    for task_index, (task, task_embeddings) in enumerate(zip(tasks, embeddings)):
        subset = random_subset(task.test_labels, config.eval.max_test_per_task, seed=config.train.seed + task_index)
        shard = subset[context.rank :: context.world_size].tolist()
        batches = [
            shard[start : start + config.eval.batch_size] for start in range(0, len(shard), config.eval.batch_size)
        ]
        to_union = torch.tensor([union_index[name] for name in task.class_names], device=device)
        counts = torch.zeros(3, dtype=torch.int64, device=device)  # correct (own classes), correct (union), seen
        for images, labels in _loader(task.test, batches, config.data.num_workers, 0):
            images, labels = images.to(device=device, dtype=dtype), labels.to(device)
            features = model.encode_image(images, normalize=True)
            counts[0] += int((features @ task_embeddings.t()).argmax(dim=1).eq(labels).sum())
            if config.eval.x_tail:
                counts[1] += int((features @ union.t()).argmax(dim=1).eq(to_union[labels]).sum())
            counts[2] += labels.numel()
        all_reduce_sum(counts, context)
        seen = max(int(counts[2]), 1)
        rows["mtil"].append(int(counts[0]) / seen)
        if config.eval.x_tail:
            rows["xtail"].append(int(counts[1]) / seen)
    model.train(was_training)
    return rows


def _on_main_rank(context: DistContext, check) -> bool:
    """check() as rank 0 sees it, on every rank: a refusal must stop every rank, not leave the others waiting in a
    collective for rank 0."""
    flag = torch.tensor([int(context.is_main and bool(check()))], device=context.device)
    return bool(all_reduce_sum(flag, context).item())


def run_continual(
    config: CLConfig, tasks: Optional[Sequence[Task]] = None, context: Optional[DistContext] = None,
    progress: bool = True,
) -> RunOutput:  # fmt: skip
    """Run (or, with run.resume, continue) the task sequence of `config`; rank 0 writes results and checkpoints
    under run.run_dir, holding its lock (a second run on the same directory is refused). `tasks` replaces the
    configured benchmark (tests, the demo)."""
    config.validate()
    if config.data.benchmark != "synthetic" and config.model.pretrained is None:
        logger.warning("model.pretrained is None: %s starts from random weights; the paper starts from CLIP's "
                       "(--pretrained openai)", config.model.name)  # fmt: skip
    context = context or init_distributed(config.model.device)
    lock, refusal = None, None
    if context.is_main:
        try:
            lock = checkpoints.lock_run_directory(config.run.run_dir)
        except (checkpoints.RunDirectoryInUse, OSError) as error:
            refusal = error
    if _on_main_rank(context, lambda: refusal is not None):
        raise refusal or checkpoints.RunDirectoryInUse(f"rank 0 could not take {config.run.run_dir!r}: see its error")
    try:
        return _run_locked(config, tasks, context, progress)
    finally:
        if lock is not None:
            checkpoints.unlock_run_directory(lock)


def _resume_state(config: CLConfig, context: DistContext) -> tuple[Optional[str], Optional[dict]]:
    """(checkpoint directory, its state) to resume from, or (None, None) to start afresh. Read and checked against
    the configuration before any model or dataset is built; an existing run is refused unless resuming."""
    run_dir = config.run.run_dir
    if not config.run.resume:
        earlier = [os.path.join(run_dir, name) for name in (checkpoints.CHECKPOINT_DIR, "results.json")]
        if _on_main_rank(context, lambda: any(os.path.exists(path) for path in earlier)):
            raise FileExistsError(
                f"{run_dir} holds an earlier run (its checkpoints or results.json); pass --resume to continue it, "
                f"or choose another --run-dir"
            )
        return None, None
    directory = checkpoints.latest_checkpoint(run_dir)
    if directory is None:
        if _on_main_rank(context, lambda: os.path.exists(os.path.join(run_dir, "results.json"))):
            raise FileExistsError(
                f"{run_dir} holds the results of a run without checkpoints (--no-checkpoints), which cannot be "
                f"resumed; choose another --run-dir"
            )
        logger.info("no checkpoint under %s: starting from the first task", run_dir)
        return None, None
    state = checkpoints.load_state(directory)
    checkpoints.check_resumable(state["config"], config.to_dict())
    return directory, state


def _run_locked(config: CLConfig, tasks: Optional[Sequence[Task]], context: DistContext, progress: bool) -> RunOutput:
    method, run_dir = config.train.method, config.run.run_dir
    resume_directory, state = _resume_state(config, context)
    seed_everything(config.train.seed)
    model, preprocess_train, preprocess_val, tokenizer = create_clip(config.model, config.train.seed, context.device)
    base_fingerprint = checkpoints.base_fingerprint(model) if config.run.checkpoints or config.run.resume else None
    tasks = list(tasks) if tasks is not None else build_tasks(config, model, preprocess_train, preprocess_val)
    if not tasks:
        raise ValueError("the task sequence is empty; expected at least one task (data.tasks)")
    trainable_parameters = prepare_method(model, config.pool, method)
    lifecycle = None
    if method in ("pool", "lora"):
        lifecycle = PoolLifecycle(
            model, top_m=merge_count(config.pool, method), ago_weight=config.train.ago_weight if method == "pool" else 0.0,
            backend=config.pool.backend,
        )  # fmt: skip
    # With gate="none" the router gets no gradient (the paper's design), which DDP must be told about. Dense LoRA has
    # no routing at all (pool_config sets its gate to "none" whatever pool.gate says).
    unused_routers = method == "pool" and pool_config(config.pool, method).gate == "none"
    train_model = wrap_model(model, context, find_unused_parameters=unused_routers)
    if config.train.compile:  # evaluation stays eager: it runs once per task, on other shapes
        train_model = torch.compile(train_model)

    task_names = [task.name for task in tasks]
    results = {
        "method": method, "tasks": task_names, "config": config.to_dict(), "world_size": context.world_size,
        "trainable_parameters": trainable_parameters, "zero_shot": None, "matrices": {"mtil": [], "xtail": []},
        "seconds_per_step": [], "final_loss": [], "merged_experts": [],
    }  # fmt: skip
    start_task = 0
    if state is not None:
        if state["results"]["tasks"] != task_names:
            raise ValueError(f"cannot resume: the checkpoint's tasks {state['results']['tasks']} != {task_names}")
        saved_fingerprint = state.get("base_fingerprint")
        if saved_fingerprint is not None and saved_fingerprint != base_fingerprint:
            raise ValueError(
                f"cannot resume: the base model's weights differ from the checkpointed run's (model.pretrained="
                f"{config.model.pretrained!r} now holds other weights); its merges belong to the old weights. "
                f"Start a new run directory"
            )
        checkpoints.load_model_part(resume_directory, model, method, context.device)
        if lifecycle is not None:
            lifecycle.load_state_dict(state["lifecycle"])
        results = state["results"]
        start_task = state["finished_tasks"]
        checkpoints.set_rng_state(state["rng"], context.device)
        logger.info("resumed from %s after %d finished task(s)", resume_directory, start_task)

    if results["zero_shot"] is None:
        results["zero_shot"] = evaluate(model, tasks, tokenizer, config, context)
    last_task = len(tasks) if config.run.stop_after_task is None else min(len(tasks), config.run.stop_after_task)
    for task_index in range(start_task, last_task):
        task = tasks[task_index]
        if context.is_main:
            logger.info("task %d/%d: %s (%d classes)", task_index + 1, len(tasks), task.name, len(task.class_names))
        if lifecycle is not None:
            lifecycle.begin_task(task_index)  # under DDP: every rank gets rank 0's fresh pools (PoolLifecycle)
        outcome = train_task(model, train_model, task, task_index, config, context, lifecycle, tokenizer, progress)
        directory = checkpoints.task_directory(run_dir, task_index, task.name)
        if lifecycle is not None:
            if context.is_main and config.run.checkpoints:
                checkpoints.save_task_pool(directory, model)
            merged = lifecycle.end_task()
            results["merged_experts"].append({name: experts.tolist() for name, experts in merged.items()})
        rows = evaluate(model, tasks, tokenizer, config, context)
        for kind in ("mtil", "xtail"):
            if rows[kind]:
                results["matrices"][kind].append(rows[kind])
        results["seconds_per_step"].append(outcome["seconds_per_step"])
        results["final_loss"].append(outcome["loss"])
        if context.is_main:
            summary = summarize(results["matrices"]["mtil"])
            logger.info(
                "after %s: accuracy on it %.1f%%, Avg so far %.1f%%, %.1f ms/step", task.name,
                100 * rows["mtil"][task_index], 100 * summary["avg"], 1000 * outcome["seconds_per_step"],
            )  # fmt: skip
            if config.run.checkpoints:
                task_state = {
                    "finished_tasks": task_index + 1, "rng": checkpoints.rng_state(context.device),
                    "lifecycle": lifecycle.state_dict() if lifecycle is not None else None, "results": results,
                    "config": config.to_dict(), "base_fingerprint": base_fingerprint,
                }  # fmt: skip
                checkpoints.save_checkpoint(directory, model, method, task_state)
            # The results so far, after every task: a run stopped later keeps them in readable files too
            # (metrics.complete says whether the matrix is whole).
            write_results(run_dir, results, plot=False)
        barrier(context)
    if context.is_main:
        write_results(run_dir, results)
        logger.debug("\n%s", format_matrix(results["matrices"]["mtil"], task_names, f"MTIL accuracy ({method})"))
    return RunOutput(results=results, model=model, is_main=context.is_main)


def clear_run_directory(run_dir: str) -> None:
    """Remove a run directory (the demo starts afresh each time), unless another run holds it."""
    if os.path.isdir(run_dir):
        checkpoints.unlock_run_directory(checkpoints.lock_run_directory(run_dir))  # refuses while another run holds it
        shutil.rmtree(run_dir)
