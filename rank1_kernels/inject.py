"""Model surgery: put pool layers into any model, and take them out again.

    inject(model, target="auto", config=PoolConfig(...))            nn.Linear -> FusedRank1PoolLinear,
                                                                    nn.MultiheadAttention -> PoolMultiheadAttention,
                                                                    timm's fused qkv -> one pool per q, k, v
    merge_all(model, top_m=4)                                       fold each layer's top experts into its weight
    unload(model)                                                   back to plain nn.Linear / nn.MultiheadAttention
    ago_penalty(model, top_m=4)                                     the AGO loss averaged over all pool layers
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from typing import Callable, Iterator, Sequence, Union

import torch
import torch.nn as nn

from .ago import ago_loss_grouped
from .attention import PoolMultiheadAttention
from .backends import check_backend_name
from ._checks import check_choice, check_top_k
from .families import (
    TEXT_ROUTING, SplitQKVLinear, find_towers, install_text_routing, is_fused_qkv, remove_text_routing, select_towers,
)
from .module import FusedRank1PoolLinear
from .routing import shared_ones, top_experts

# open_clip and OpenAI CLIP residual blocks: the attention (q, k, v, out) and both MLP linears of every block,
# in both towers: 144 pool layers for ViT-B/16, as in the paper.
DEFAULT_TARGETS = ("attn", "mlp.c_fc", "mlp.c_proj")
ATTENTION_ROLES = ("q", "k", "v", "out")

Target = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


@dataclasses.dataclass
class PoolConfig:
    """How each injected pool layer is built (see FusedRank1PoolLinear)."""

    r: int = 12
    k: int = 8
    alpha: float = 1.0
    routing: str = "sample"
    gate: str = "none"
    dropout: float = 0.0
    backend: str = "auto"
    attention_projections: tuple[str, ...] = ATTENTION_ROLES

    def __post_init__(self) -> None:
        check_backend_name(self.backend)
        unknown = set(self.attention_projections) - set(ATTENTION_ROLES)
        if unknown:
            raise ValueError(f"attention_projections has {sorted(unknown)}; expected a subset of {ATTENTION_ROLES}")


def _matcher(target: Target) -> Callable[[str, nn.Module], bool]:
    if callable(target):
        return target
    patterns = (target,) if isinstance(target, str) else tuple(target)
    # As in peft's target_modules, a pattern names the end of a qualified name: "mlp.c_fc" matches
    # "visual.transformer.resblocks.0.mlp.c_fc" and a top-level "mlp.c_fc" alike.
    return lambda name, module: any(
        fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern) for pattern in patterns
    )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    # The replacement takes the train/eval mode of the module it replaces (new modules start in training mode).
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)


def _batch_first_for(name: str, attention_layouts: dict[str, bool]) -> bool:
    """A Linear's layout is that of the attention in its own block (OpenAI CLIP's blocks are sequence-first):
    the nearest ancestor that holds an attention not inside a list of blocks. Batch-first when there is none, as
    for a stem or a head beside the blocks ("blocks.3.attn" is one block's attention, not the model's)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth] + [""]) if depth else ""
        for attention_name, batch_first in attention_layouts.items():
            inner = attention_name[len(prefix):].split(".")
            if attention_name.startswith(prefix) and not any(part.isdigit() for part in inner):
                return batch_first
    return True


def pool_layers(model: nn.Module) -> Iterator[tuple[str, FusedRank1PoolLinear]]:
    """(qualified name, layer) for every pool layer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, FusedRank1PoolLinear):
            yield name, module


def _target_matcher(target: Target, towers, restrict_to_towers: bool) -> Callable[[str, nn.Module], bool]:
    """target="auto": each tower's default targets inside its blocks (DEFAULT_TARGETS anywhere when the model has
    no recognised tower); otherwise the given patterns, inside the selected towers when towers were selected."""
    if isinstance(target, str) and target == "auto":
        if not towers:
            return _matcher(DEFAULT_TARGETS)
        tower_matchers = [(tower, _matcher(tower.default_targets)) for tower in towers]
        return lambda name, module: any(tower.contains(name) and m(name, module) for tower, m in tower_matchers)
    matches = _matcher(target)
    if not restrict_to_towers:
        return matches
    return lambda name, module: matches(name, module) and any(tower.contains(name) for tower in towers)


def inject(
    model: nn.Module,
    target: Target = "auto",
    config: PoolConfig | None = None,
    *,
    towers: str | Sequence[str] | None = None,
    text_routing: str = "eot",
    **overrides,
) -> nn.Module:
    """Swap every nn.Linear and nn.MultiheadAttention whose qualified name matches `target` for pool layers built
    from `config` (keyword overrides allowed). In place; returns the model. Before training the injected model
    computes what the original computed.

    target: "auto" (the default targets of every tower that rank1_kernels.families recognises: open_clip, OpenAI
    clip, transformers CLIP, timm ViT; DEFAULT_TARGETS when none is recognised), glob patterns that match the whole
    qualified name or its end after a dot, or a callable(name, module) -> bool.
    towers: None (all) or a subset of ("vision", "text"): only modules inside those towers' blocks.
    text_routing: "eot" routes text-tower layers on each caption's end-of-text token, "first" on token 0 (the
    paper's code; constant under the causal mask). A timm fused qkv Linear gets one pool per q, k, v slice."""
    config = dataclasses.replace(config or PoolConfig(), **overrides)
    check_choice("text_routing", text_routing, TEXT_ROUTING)
    found_towers = find_towers(model)
    matches = _target_matcher(target, select_towers(found_towers, towers), restrict_to_towers=towers is not None)
    attention_layouts = {
        name: module.batch_first for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)
    }

    def make_pool(linear: nn.Linear, batch_first: bool) -> FusedRank1PoolLinear:
        return FusedRank1PoolLinear.from_linear(
            linear, r=config.r, k=config.k, alpha=config.alpha, routing=config.routing, gate=config.gate,
            dropout=config.dropout, backend=config.backend, batch_first=batch_first,
        )  # fmt: skip

    replacements: dict[str, nn.Module] = {}
    made: dict[int, nn.Module] = {}  # id(original) -> its replacement, for a module used at several places
    inside_replaced: tuple[str, ...] = ()
    pools_before: list[tuple[str, FusedRank1PoolLinear]] = []  # targets that are pool layers already
    # Every place a module is used, so that one used twice is replaced at both places by one new module.
    for name, module in model.named_modules(remove_duplicate=False):
        if inside_replaced and name.startswith(inside_replaced):
            continue  # the out_proj inside a matched attention, or a submodule of a pool layer
        if isinstance(module, (FusedRank1PoolLinear, PoolMultiheadAttention, SplitQKVLinear)):
            inside_replaced += (name + ".",)  # injected before: its router and projections are not targets
            if matches(name, module):
                pools_before += [(f"{name}.{sub}" if sub else name, layer) for sub, layer in pool_layers(module)]
            continue
        if id(module) in made:
            replacements[name] = made[id(module)]
            inside_replaced += (name + ".",)
            continue
        if not matches(name, module):
            continue
        if isinstance(module, nn.MultiheadAttention):

            def wrap(role: str, linear: nn.Linear) -> nn.Module:
                # Inside PoolMultiheadAttention every projection sees batch-first rows.
                return make_pool(linear, batch_first=True) if role in config.attention_projections else linear

            replacements[name] = PoolMultiheadAttention.from_mha(module, wrap)
            inside_replaced += (name + ".",)
        elif isinstance(module, nn.Linear) and is_fused_qkv(name, module, found_towers):
            batch_first = _batch_first_for(name, attention_layouts)

            def wrap_slice(role: str, linear: nn.Linear) -> nn.Module:
                return make_pool(linear, batch_first) if role in config.attention_projections else linear

            replacements[name] = SplitQKVLinear.from_linear(module, wrap_slice)
            inside_replaced += (name + ".",)
        elif isinstance(module, nn.Linear):
            replacements[name] = make_pool(module, _batch_first_for(name, attention_layouts))
            inside_replaced += (name + ".",)
        if name in replacements:
            made[id(module)] = replacements[name]
    _check_pools_before(pools_before, config)
    if not replacements and pools_before:
        return model  # inject() again with the same targets and settings: nothing left to do
    if not replacements:
        n_pools = sum(1 for _ in pool_layers(model))
        before = f" (the model has {n_pools} pool layers already: inject() ran on it before)" if n_pools else ""
        raise ValueError(
            f"inject() matched no nn.Linear or nn.MultiheadAttention with target={target!r}{before}; "
            f"pass glob patterns over module names as printed by model.named_modules()"
        )
    if "" in replacements:
        raise ValueError("inject() cannot replace the model object itself; use FusedRank1PoolLinear.from_linear()")
    if isinstance(target, str) and target == "auto" and not found_towers:
        _warn_about_generic_targets(replacements)
    for name, new in replacements.items():
        _set_submodule(model, name, new)
    install_text_routing(model, found_towers, text_routing)
    return model


def _check_pools_before(pools_before: list[tuple[str, FusedRank1PoolLinear]], config: PoolConfig) -> None:
    """inject() does not rebuild a pool layer: a call whose settings differ from those of the pools it finds would
    otherwise keep the old pools silently (a second inject(r=64) training r=12 pools)."""
    wanted = {field: getattr(config, field) for field in ("r", "k", "alpha", "routing", "gate", "dropout", "backend")}
    for name, layer in pools_before:
        found = {**layer.config(), "backend": layer.backend}
        changed = {field: (found[field], value) for field, value in wanted.items() if found[field] != value}
        if changed:
            differences = ", ".join(f"{field}={old!r} (this call asks for {new!r})" for field, (old, new) in changed.items())
            raise ValueError(
                f"inject(): {name!r} is a pool layer already, with {differences}; inject() does not rebuild pools. "
                f"To start again from plain layers call merge_all() (to keep what was learnt) and unload() first; "
                f"to change only the backend, set each pool layer's .backend"
            )


def _warn_about_generic_targets(replacements: dict[str, nn.Module]) -> None:
    """target="auto" on a model of no known family falls back to DEFAULT_TARGETS (CLIP's names): say which of those
    patterns found nothing, so that a model naming its layers fc1/fc2 does not silently train attention pools only."""
    unmatched = [pattern for pattern in DEFAULT_TARGETS if not any(_matcher(pattern)(name, None) for name in replacements)]
    if unmatched:
        warnings.warn(
            f"inject(target='auto') recognised no model family (open_clip, OpenAI clip, transformers CLIP, timm ViT) "
            f"and used the generic patterns {DEFAULT_TARGETS}, of which {unmatched} matched nothing "
            f"({len(replacements)} module(s) injected); pass target= patterns to choose the layers",
            stacklevel=3,
        )


def unload(model: nn.Module) -> nn.Module:
    """Replace every pool layer by a plain nn.Linear, every PoolMultiheadAttention by nn.MultiheadAttention and
    every split qkv by its fused nn.Linear, with the merged weights, and remove the routing hooks. Unmerged pool
    experts are dropped: call merge_all() first. In place; returns model."""
    remove_text_routing(model)
    replacements = {}
    for name, module in model.named_modules():
        if any(name.startswith(done + ".") for done in replacements):
            continue
        if isinstance(module, PoolMultiheadAttention):
            replacements[name] = module.to_mha()
        elif isinstance(module, (FusedRank1PoolLinear, SplitQKVLinear)):
            replacements[name] = module.to_linear()
    for name, new in replacements.items():
        if name == "":
            raise ValueError("unload() cannot replace the model object itself; call model.to_linear() instead")
        _set_submodule(model, name, new)
    return model


def check_top_m(model: nn.Module, top_m: int) -> None:
    """top_m experts to merge (or to constrain by AGO) must exist in every pool layer: checked for all layers before
    any changes, so that a bad top_m never leaves a model half merged."""
    for name, layer in pool_layers(model):
        check_top_k(top_m, layer.r, what=f"top_m (pool layer {name!r})")


def merge_all(model: nn.Module, top_m: int = 4, reset_pool: bool = True) -> dict[str, torch.Tensor]:
    """merge(top_m) on every pool layer (the end of a task); returns each layer's merged expert indices. top_m is
    checked against every layer first: a bad one merges nothing."""
    check_top_m(model, top_m)
    return {name: layer.merge(top_m, reset_pool=reset_pool) for name, layer in pool_layers(model)}


def mark_only_pool_trainable(model: nn.Module) -> int:
    """requires_grad only for the pool parameters (lora_A, lora_B, router); returns the trainable count."""
    if not any(True for _ in pool_layers(model)):
        raise ValueError("mark_only_pool_trainable(): the model has no pool layers (it would freeze everything); "
                         "call inject() first")  # fmt: skip
    model.requires_grad_(False)
    count = 0
    for _, layer in pool_layers(model):
        for parameter in layer.pool_parameters():
            parameter.requires_grad_(True)
            count += parameter.numel()
    return count


def ago_penalty(model: nn.Module, top_m: int = 4, p: int = 1, backend: str = "auto") -> torch.Tensor:
    """AGO loss averaged over all pool layers: the current top_m experts' B columns (by activation counts so far)
    against every B column merged after earlier tasks. Zero before the first merge."""
    layers = [layer for _, layer in pool_layers(model)]
    if not layers:
        raise ValueError("ago_penalty(): the model has no pool layers; call inject() first")
    B_curs = [layer.lora_B for layer in layers]
    B_prevs = [layer.merged_B for layer in layers]
    cur_masks = current_top_masks(layers, top_m)
    prev_masks = _all_true_masks(B_prevs)
    return ago_loss_grouped(B_curs, B_prevs, cur_masks, prev_masks, p=p, backend=backend).mean()


def current_top_masks(layers: Sequence[FusedRank1PoolLinear], top_m: int) -> list[torch.Tensor]:
    """`layer.current_top_mask(top_m)` of every layer, the same masks, with one sort per group of layers that share
    r, device and count dtype (one for CLIP's 144 layers) instead of a few small launches per layer every step."""
    groups: dict[tuple, list[int]] = {}
    for position, layer in enumerate(layers):
        check_top_k(top_m, layer.r, what="top_m")
        counts = layer.activation_counts
        groups.setdefault((layer.r, counts.device, counts.dtype), []).append(position)
    masks: list[torch.Tensor] = [torch.empty(0)] * len(layers)
    for (r, device, _), members in groups.items():
        top = top_experts(torch.stack([layers[i].activation_counts for i in members]), top_m)
        rows = torch.zeros(len(members), r, dtype=torch.bool, device=device).scatter_(1, top, True)
        for position, row in zip(members, rows.unbind(0)):
            masks[position] = row
    return masks


def _all_true_masks(matrices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """An all-true boolean (n_columns,) mask per matrix: read-only views of one cached element, no launch."""
    return [shared_ones((matrix.shape[1],), torch.bool, matrix.device) for matrix in matrices]
