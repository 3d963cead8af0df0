"""A whole training step of CLIP (both towers, a pool layer on q, k, v, out, c_fc and c_proj of every block):
our layer (each backend that accepts the inputs) vs the released code's way (materialised Delta W) vs dense
LoRA, in steps/s and peak memory.

The model is open_clip's CLIP built from a config (ViT-B-16 by default) with random weights; every variant
starts from the same injected model and trains only the adapters (AdamW) on a symmetric image-text
contrastive loss. The AGO term is left out here (it is timed on its own by `ago_bench`). Inputs (random
images and token ids) are made before timing and alternate between two batches.

With `cuda_graphs` (gpu preset) each variant is also timed with its whole step (forward, backward, AdamW with
capturable=True) captured in a CUDA graph: the GPU time alone. An eager step of 144 pool layers is bound by the host
(docs/TRITON.md, "Host time in eager mode"), so the `events` rows include the host's time.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rank1_kernels import PoolConfig, inject, known_backends, pool_layers

from .baselines import DenseLoRALinear, OfficialPoolLinear
from .layer import DTYPES, backend_refusal
from .timing import TimeBudget, TimingConfig, measure, timers_for
from .variants import is_bench_variant

OFFICIAL, DENSE = "official (dense dW)", "dense LoRA"


@dataclasses.dataclass
class StepConfig:
    """model: an open_clip config name; vision/text overrides shrink it (e.g. fewer layers for CPU runs)."""

    model: str = "ViT-B-16"
    vision_overrides: dict = dataclasses.field(default_factory=dict)
    text_overrides: dict = dataclasses.field(default_factory=dict)
    embed_dim: int | None = None
    batch_size: int = 32
    dtypes: list[str] = dataclasses.field(default_factory=lambda: ["fp32"])
    r: int = 12
    k: int = 8
    routing: str = "batch"
    warmup_steps: int = 3
    timed_steps: int = 10
    learning_rate: float = 2e-3
    cuda_graphs: bool = False


def build_clip(config: StepConfig, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """open_clip CLIP with random weights from the named config plus overrides; returns (model, the config used)."""
    import open_clip
    from open_clip.model import CLIP

    model_config = copy.deepcopy(open_clip.get_model_config(config.model))
    if model_config is None:
        raise ValueError(f"open_clip has no model config {config.model!r}; see open_clip.list_models()")
    model_config["vision_cfg"].update(config.vision_overrides)
    model_config["text_cfg"].update(config.text_overrides)
    if config.embed_dim is not None:
        model_config["embed_dim"] = config.embed_dim
    model = CLIP(**model_config).to(device=device, dtype=dtype)
    return model, model_config


def _swap_pool_layers(model: nn.Module, make) -> None:
    for name, layer in list(pool_layers(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(layer))


def make_variant(base: nn.Module, variant: str) -> nn.Module:
    """A deep copy of the injected model with its pool layers as `variant` computes them; only adapters train."""
    model = copy.deepcopy(base)
    if variant == OFFICIAL:
        _swap_pool_layers(model, OfficialPoolLinear)
    elif variant == DENSE:
        _swap_pool_layers(model, DenseLoRALinear.from_pool)
    else:
        for _, layer in pool_layers(model):
            layer.backend = variant[len("pool[") : -1]
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or ".router." in name:
            parameter.requires_grad_(True)
    return model.train()


def contrastive_loss(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    image_features, text_features, logit_scale = model(images, texts)[:3]
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    labels = torch.arange(images.shape[0], device=images.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def run_step(
    config: StepConfig,
    device: torch.device,
    log=None,
    time_forced_only: bool = False,
    budget: TimeBudget | None = None,
) -> Iterable[dict]:
    budget = budget or TimeBudget()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    for dtype_name in config.dtypes:
        if not budget.allows(f"step {config.model} {dtype_name}"):
            continue
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        base, model_config = build_clip(config, device, dtype)
        inject(base, config=PoolConfig(r=config.r, k=config.k, routing=config.routing))
        n_pool_layers = sum(1 for _ in pool_layers(base))
        vision, text = model_config["vision_cfg"], model_config["text_cfg"]
        generator = torch.Generator(device=device).manual_seed(0)
        image_size = vision["image_size"]
        image_shape = (config.batch_size, 3, image_size, image_size)
        text_shape = (config.batch_size, text["context_length"])
        batches = [
            (
                torch.randn(image_shape, generator=generator, device=device, dtype=dtype),
                torch.randint(0, text["vocab_size"], text_shape, generator=generator, device=device),
            )
            for _ in range(2)
        ]  # fmt: skip
        first_layer = next(layer for _, layer in pool_layers(base))
        example = torch.zeros(config.batch_size, 2, first_layer.in_features, device=device, dtype=dtype)
        backends = [name for name in known_backends() if not is_bench_variant(name)]
        variants: dict[str, str | None] = {
            f"pool[{name}]": backend_refusal(name, first_layer, example, time_forced_only) for name in backends
        }
        variants.update({OFFICIAL: None, DENSE: None})
        conditions = dict(
            section="step", group="step", model=config.model, dtype=dtype_name, batch_size=config.batch_size,
            n_pool_layers=n_pool_layers, r=config.r, k=config.k, routing=config.routing,
            vision_layers=vision["layers"], vision_width=vision["width"], image_size=image_size,
            patch_size=vision["patch_size"], text_layers=text["layers"], text_width=text["width"],
            context_length=text["context_length"],
        )  # fmt: skip
        rows = []
        for variant, refusal in variants.items():
            for timer in timers_for(device, config.cuda_graphs):
                log(f"[step] {config.model} {dtype_name} batch {config.batch_size}: {variant} ({timer})")
                row = dict(conditions, method=variant, timer=timer)
                if refusal is not None:
                    rows.append(dict(row, status="refused", reason=refusal))
                    continue
                try:
                    model = make_variant(base, variant)
                    rows.append(dict(row, **_time_variant(model, batches, config, device, timer == "cuda-graph")))
                except Exception as exc:  # reported in the table; the other variants still run
                    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    rows.append(dict(row, status="error", reason=reason))
                finally:
                    model = None  # its memory (and a captured graph's pool) goes before the next variant's
                if device.type == "cuda":
                    try:
                        torch.cuda.empty_cache()
                    except RuntimeError:
                        pass  # after a sticky CUDA error: the next variant reports it
        dense = {r["timer"]: r["median_ms"] for r in rows if r["method"] == DENSE and r["status"] == "ok"}
        for row in rows:
            ok = row["status"] == "ok" and row["timer"] in dense
            row["ratio_to_dense_lora"] = row["median_ms"] / dense[row["timer"]] if ok else None
        del base
        yield from rows


def _time_variant(model: nn.Module, batches, config: StepConfig, device: torch.device, cuda_graph: bool = False
                  ) -> dict:  # fmt: skip
    """Time the training step; with cuda_graph, the whole step (AdamW capturable) replayed from CUDA graphs."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=1e-2, capturable=cuda_graph)

    def train_step(i: int) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = contrastive_loss(model, *batches[i])
        loss.backward()
        optimizer.step()
        return loss.detach()

    first_loss = float(train_step(0))
    timing = TimingConfig(
        warmup=config.warmup_steps, min_samples=config.timed_steps, max_samples=config.timed_steps, target_seconds=0.0
    )
    measurement = measure(train_step, len(batches), device, timing, cuda_graph=cuda_graph)
    peak = None
    if device.type == "cuda" and not cuda_graph:  # a graph's memory is its pool, allocated at capture
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(0)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    n_trainable = sum(p.numel() for p in trainable)
    return {
        "status": "ok", "reason": "", **dataclasses.asdict(measurement), "peak_memory_mib": peak,
        "steps_per_s": 1e3 / measurement.median_ms, "trainable_parameters": n_trainable, "first_loss": first_loss,
    }  # fmt: skip
