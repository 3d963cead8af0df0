"""The CLIP model: open_clip creation (any architecture name or a local checkpoint), the method's trainable
parameters (pool layers, dense LoRA, or every weight) and the parameter-count report.

    model, preprocess_train, preprocess_val, tokenizer = create_clip(config.model, seed=config.train.seed)
    trainable = prepare_method(model, config.pool, config.train.method)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn as nn

from rank1_kernels import PoolConfig, inject, mark_only_pool_trainable, pool_layers

from .config import ModelConfig, PoolSettings

TINY_MODEL = "rank1-tiny-vit"
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_OPEN_CLIP_PRECISION = {"fp32": "fp32", "fp64": "fp32", "bf16": "pure_bf16", "fp16": "pure_fp16"}


def open_clip_module():
    """open_clip with this package's model configs registered (the tiny test/demo model)."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError("rank1_cl needs open_clip: pip install 'rank1-kernels[clip]'") from error
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    return open_clip


def create_clip(config: ModelConfig, seed: int = 0, device=None):
    """(model, preprocess_train, preprocess_val, tokenizer). Random weights (pretrained=None) are drawn from `seed`,
    so every process and every resumed run builds the same base model."""
    open_clip = open_clip_module()
    if config.name not in open_clip.list_models() and not config.name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"model.name={config.name!r} is not an open_clip architecture; expected one of open_clip.list_models() "
            f"(e.g. 'ViT-B-16') or {TINY_MODEL!r}"
        )
    pretrained = config.pretrained
    if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"model.pretrained={pretrained!r}: no such checkpoint file")
    elif pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(config.name):
        tags = open_clip.list_pretrained_tags_by_model(config.name)
        raise ValueError(
            f"model.pretrained={pretrained!r} is neither a file nor a pretrained tag of {config.name}; "
            f"expected a checkpoint path or one of {tags}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            config.name, pretrained=pretrained, precision=_OPEN_CLIP_PRECISION[config.precision],
            device=device or config.device, force_quick_gelu=needs_quick_gelu(open_clip, config.name, pretrained),
        )  # fmt: skip
    if config.precision == "fp64":
        model = model.double()
    tokenizer = open_clip.get_tokenizer(config.name)
    return model, preprocess_train, preprocess_val, tokenizer


def needs_quick_gelu(open_clip, name: str, pretrained: str | None) -> bool:
    """Whether the pretrained tag's weights were trained with QuickGELU (OpenAI's CLIP were). open_clip 3 builds
    "ViT-B-16" with nn.GELU whatever the tag and only warns when the weights expect QuickGELU, which lowers every
    accuracy, zero-shot included; older open_clip switched by itself. A checkpoint file carries no such flag: name
    the architecture with its "-quickgelu" suffix (e.g. ViT-B-16-quickgelu) for OpenAI weights saved to a file."""
    if not pretrained or os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return False
    return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


def pool_config(settings: PoolSettings, method: str) -> PoolConfig:
    """The kernel package's PoolConfig for a method: "pool" as configured; "lora" a dense LoRA of rank r
    (every expert active for every sample: k = r, nothing to route)."""
    config = PoolConfig(
        r=settings.r, k=settings.k, alpha=settings.alpha, routing=settings.routing, gate=settings.gate,
        dropout=settings.dropout, backend=settings.backend, attention_projections=tuple(settings.attention_projections),
    )  # fmt: skip
    if method == "lora":
        config = dataclasses.replace(config, k=settings.r, routing="sample", gate="none")
    return config


def merge_count(settings: PoolSettings, method: str) -> int:
    """Experts merged per layer after each task: the top merge_top_m for the pool, all r for dense LoRA."""
    return settings.r if method == "lora" else settings.merge_top_m


def prepare_method(model: nn.Module, settings: PoolSettings, method: str) -> int:
    """Make `model` trainable the method's way (in place); returns the number of trainable parameters."""
    if method in ("pool", "lora"):
        inject(
            model,
            target=list(settings.targets),
            config=pool_config(settings, method),
            text_routing=settings.text_routing,
        )
        count = mark_only_pool_trainable(model)
        if method == "lora":  # every expert serves every sample: the routers choose nothing and learn nothing
            for _, layer in pool_layers(model):
                layer.router.requires_grad_(False)
                count -= sum(parameter.numel() for parameter in layer.router.parameters())
        return count
    if method == "full":
        model.requires_grad_(True)
        return sum(parameter.numel() for parameter in model.parameters())
    raise ValueError(f"method={method!r}; expected one of pool, lora, full")


def parameter_report(model_name: str = "ViT-B-16", settings: PoolSettings | None = None) -> dict:
    """Counts read from the model itself, built on the meta device (no memory, no weights): the trainable pool
    parameters with and without routers, the number of pool layers, and the full model's parameters."""
    settings = settings or PoolSettings()
    open_clip = open_clip_module()
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"model {model_name!r} is not an open_clip architecture; expected one of open_clip.list_models()"
        )
    with torch.device("meta"):
        model = open_clip.create_model(model_name, pretrained=None, device="meta")
        full_model_parameters = sum(parameter.numel() for parameter in model.parameters())
        inject(model, target=list(settings.targets), config=pool_config(settings, "pool"))
    trainable = mark_only_pool_trainable(model)
    layers = [layer for _, layer in pool_layers(model)]
    adapters = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in layers)
    routers = sum(parameter.numel() for layer in layers for parameter in layer.router.parameters())
    if trainable != adapters + routers:
        raise RuntimeError(f"trainable count {trainable} != adapters {adapters} + routers {routers}")
    return {
        "model": model_name, "r": settings.r, "pool_layers": len(layers),
        "trainable_with_routers": trainable, "trainable_without_routers": adapters, "router_parameters": routers,
        "full_finetuning_parameters": full_model_parameters,
        "fraction_of_full": trainable / full_model_parameters,
        "trainable_mib_fp32": trainable * 4 / 2**20,
    }  # fmt: skip


def format_parameter_report(report: dict) -> str:
    return "\n".join(
        [
            f"model {report['model']}: {report['pool_layers']} pool layers of r={report['r']} rank-1 experts",
            (
                f"  trainable, with routers:    {report['trainable_with_routers']:>12,}  "
                f"({report['trainable_mib_fp32']:.2f} MiB fp32)"
            ),
            f"  trainable, without routers: {report['trainable_without_routers']:>12,}",
            (
                f"  full fine-tuning:           {report['full_finetuning_parameters']:>12,}  "
                f"(the pool trains {100 * report['fraction_of_full']:.1f}%, "
                f"{100 * (1 - report['fraction_of_full']):.1f}% fewer)"
            ),
        ]
    )
