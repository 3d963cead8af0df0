"""Model families that inject() recognises, their default targets, towers and routing tokens.

    family       where it comes from                                   default targets (in each tower's blocks)
    open_clip    open_clip CLIP / CustomTextCLIP (batch- or seq-first)  attn (q, k, v, out), mlp.c_fc, mlp.c_proj
    openai_clip  OpenAI's clip layout, as copied by ZSCL, MoE-Adapters,  the same (sequence-first nn.MultiheadAttention)
                 DIKI and the paper's code
    hf_clip      transformers' CLIPModel / CLIPTextModel / CLIPVision*  self_attn.{q,k,v,out}_proj, mlp.fc1, mlp.fc2
    timm_vit     timm VisionTransformer                                 attn.qkv (split: one pool per q, k, v slice),
                                                                        attn.proj, mlp.fc1, mlp.fc2

Towers are found by structure anywhere in the model, so a CL codebase's wrapper (`self.model = clip_model`) is seen
through. A tower is its stack of residual blocks; targets and tower selection apply to the modules inside it.

Routing token. Vision towers route on token 0, the [CLS] token (a timm ViT built without a class token has a patch
there). Text towers are causal: token 0 is the start token, the same for every caption, so routing on it gives every
sample the same experts. text_routing="eot" (the default) routes each text layer on the token its tower pools, the
end-of-text token, found per sample from the token ids exactly as the tower's own pooling finds it (argmax of the
ids for CLIP's tokenizer, the first eos id where the model is configured so); text_routing="first" keeps token 0,
as in the paper's released code. The pooled text feature itself is not offered as a routing signal: it exists only
after the last block and has another width than most layers' inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
import torch.nn as nn

from .module import FusedRank1PoolLinear, linear_from

CLIP_BLOCK_TARGETS = ("attn", "mlp.c_fc", "mlp.c_proj")
HF_CLIP_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
TIMM_VIT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
TOWER_KINDS = ("vision", "text")
TEXT_ROUTING = ("eot", "first")


# ---- the token a text tower pools ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PooledTokenPosition:
    """Which token of each caption a text tower pools, from its token ids (n_samples, n_tokens) -> (n_samples,).

    rule: "argmax" (CLIP's end-of-text token has the largest id), "eos" (first position of eos_id), "first", "last".
    """

    rule: str = "argmax"
    eos_id: int | None = None

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.dim() != 2:
            raise ValueError(
                f"end-of-text routing expects token ids of shape (n_samples, n_tokens), got {tuple(token_ids.shape)}"
            )
        n_samples, n_tokens = token_ids.shape
        if self.rule == "argmax":
            return token_ids.argmax(dim=-1)
        if self.rule == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        position = 0 if self.rule == "first" else n_tokens - 1
        return torch.full((n_samples,), position, dtype=torch.int64, device=token_ids.device)


def _open_clip_pooled_position(text_root: nn.Module) -> PooledTokenPosition:
    """open_clip's CLIP keeps text_pool_type/text_eos_id, its TextTransformer pool_type/eos_id; OpenAI's has neither."""
    rule = getattr(text_root, "text_pool_type", getattr(text_root, "pool_type", "argmax"))
    eos_id = getattr(text_root, "text_eos_id", getattr(text_root, "eos_id", None))
    if rule not in ("argmax", "eos", "first", "last"):
        raise ValueError(f"text tower pools with {rule!r}; end-of-text routing supports argmax, eos, first and last")
    return PooledTokenPosition(rule, eos_id)


def _hf_pooled_position(text_root: nn.Module) -> PooledTokenPosition:
    # transformers' CLIP text model: argmax for configs with the old eos_token_id == 2, else the first eos token.
    eos_id = getattr(text_root, "eos_token_id", 2)
    return PooledTokenPosition("argmax") if eos_id == 2 else PooledTokenPosition("eos", eos_id)


# ---- towers ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tower:
    """One encoder tower found in a model.

    kind: "vision" or "text"; family: see the module docstring; blocks: qualified name of the module that holds the
    residual blocks (targets apply inside it); token_embedding: for text towers, the nn.Embedding that receives the
    token ids; pooled_position: for text towers, which token the tower pools."""

    kind: str
    family: str
    blocks: str
    default_targets: tuple[str, ...]
    token_embedding: str | None = None
    pooled_position: PooledTokenPosition | None = None

    def contains(self, name: str) -> bool:
        return self.blocks == "" or name == self.blocks or name.startswith(self.blocks + ".")


def _from_package(module: nn.Module, package: str) -> bool:
    return type(module).__module__.split(".")[0] == package


def _qualified(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def find_towers(model: nn.Module) -> list[Tower]:
    """Every vision and text tower of the families above found in `model`, in module order."""
    towers = []
    for name, module in model.named_modules():
        blocks = getattr(module, "transformer", None)
        clip_layout = blocks is not None and hasattr(blocks, "resblocks")
        family = "open_clip" if _from_package(module, "open_clip") else "openai_clip"
        if clip_layout and hasattr(module, "class_embedding"):
            towers.append(Tower("vision", family, _qualified(name, "transformer"), CLIP_BLOCK_TARGETS))
        elif clip_layout and isinstance(getattr(module, "token_embedding", None), nn.Embedding):
            towers.append(Tower(
                "text", family, _qualified(name, "transformer"), CLIP_BLOCK_TARGETS,
                token_embedding=_qualified(name, "token_embedding"), pooled_position=_open_clip_pooled_position(module),
            ))  # fmt: skip
        elif _from_package(module, "transformers") and hasattr(getattr(module, "encoder", None), "layers"):
            embeddings = getattr(module, "embeddings", None)
            encoder = _qualified(name, "encoder")
            if hasattr(embeddings, "class_embedding"):
                towers.append(Tower("vision", "hf_clip", encoder, HF_CLIP_TARGETS))
            elif isinstance(getattr(embeddings, "token_embedding", None), nn.Embedding):
                towers.append(Tower(
                    "text", "hf_clip", encoder, HF_CLIP_TARGETS,
                    token_embedding=_qualified(name, "embeddings.token_embedding"),
                    pooled_position=_hf_pooled_position(module),
                ))  # fmt: skip
        elif _from_package(module, "timm") and hasattr(module, "blocks") and hasattr(module, "patch_embed"):
            towers.append(Tower("vision", "timm_vit", _qualified(name, "blocks"), TIMM_VIT_TARGETS))
    return towers


def detect_family(model: nn.Module) -> str:
    """The family of the model's towers ("open_clip", "openai_clip", "hf_clip", "timm_vit"), "generic" when none is
    found; "mixed" when towers of several families are found."""
    families = {tower.family for tower in find_towers(model)}
    if not families:
        return "generic"
    return families.pop() if len(families) == 1 else "mixed"


def select_towers(towers: list[Tower], selected) -> list[Tower]:
    """Towers of the kinds in `selected` (None: all); a kind that the model does not have is an error."""
    if selected is None:
        return towers
    kinds = (selected,) if isinstance(selected, str) else tuple(selected)
    unknown = set(kinds) - set(TOWER_KINDS)
    if unknown:
        raise ValueError(f"towers={selected!r} names {sorted(unknown)}; expected a subset of {TOWER_KINDS}")
    if not towers:
        raise ValueError(
            f"towers={selected!r} was given but the model has no vision or text tower of a known family (open_clip, "
            f"OpenAI clip, transformers CLIP, timm ViT); leave towers=None and select modules by target patterns"
        )
    missing = [kind for kind in kinds if not any(tower.kind == kind for tower in towers)]
    if missing:
        found = sorted({tower.kind for tower in towers})
        raise ValueError(f"towers={selected!r}: the model has no {missing} tower (found {found})")
    return [tower for tower in towers if tower.kind in kinds]


# ---- timm's fused qkv Linear -----------------------------------------------------------------------------------


class SplitQKVLinear(nn.Module):
    """A fused qkv nn.Linear(in, 3 * d) held as three projections q_proj, k_proj, v_proj (each a pool layer or a
    plain nn.Linear(in, d)), so that q, k and v get a pool each rather than one pool shared by the three slices.

    forward(x: (..., in)) -> (..., 3 d), the concatenation [q, k, v] the fused Linear computed.
    to_linear() packs it back into the original nn.Linear(in, 3 d) with the current (merged) weights."""

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj
        self.in_features = q_proj.in_features
        self.out_features = q_proj.out_features + k_proj.out_features + v_proj.out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, wrap: Callable[[str, nn.Linear], nn.Module]) -> "SplitQKVLinear":
        """Split `linear` into its q, k, v row blocks and pass each through wrap(role, nn.Linear), role in q, k, v."""
        if linear.out_features % 3 != 0:
            raise ValueError(f"a fused qkv Linear needs out_features divisible by 3, got {linear.out_features}")
        biases = linear.bias.chunk(3) if linear.bias is not None else (None, None, None)
        parts = [linear_from(weight, bias) for weight, bias in zip(linear.weight.chunk(3), biases)]
        projections = [wrap(role, part) for role, part in zip(("q", "k", "v"), parts)]
        return cls(*projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def to_linear(self) -> nn.Linear:
        """The fused nn.Linear with the current weights; unmerged pool experts are not included."""
        parts = [
            p.to_linear() if isinstance(p, FusedRank1PoolLinear) else p for p in (self.q_proj, self.k_proj, self.v_proj)
        ]
        bias = torch.cat([part.bias for part in parts]).detach() if parts[0].bias is not None else None
        fused = linear_from(torch.cat([part.weight for part in parts]).detach(), bias)
        # The fused weight is trainable when any part is (whatever the grad mode the caller runs in).
        fused.weight.requires_grad_(any(part.weight.requires_grad for part in parts))
        if bias is not None:
            fused.bias.requires_grad_(any(part.bias.requires_grad for part in parts))
        return fused

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (q, k, v split)"


def is_fused_qkv(name: str, module: nn.Module, towers: list[Tower]) -> bool:
    """A timm attention's fused qkv Linear: named "<...>.attn.qkv" inside a timm ViT tower."""
    return (
        isinstance(module, nn.Linear)
        and name.endswith("attn.qkv")
        and module.out_features % 3 == 0
        and any(tower.family == "timm_vit" and tower.contains(name) for tower in towers)
    )


# ---- end-of-text routing ---------------------------------------------------------------------------------------


class EndOfTextRouting:
    """Forward pre-hook on a text tower's token embedding: from the token ids it sets `routing_positions` (the
    pooled token of each caption) on every pool layer inside the tower's blocks, so they route on that token.

    The positions stay set until the next call through the embedding (so that activation checkpointing recomputes
    the same routing); a text tower run on embeddings without token ids would reuse them, and a batch of another
    size is refused by the layer."""

    def __init__(self, blocks: nn.Module, pooled_position: PooledTokenPosition) -> None:
        self.blocks = blocks
        self.pooled_position = pooled_position

    def __call__(self, embedding: nn.Module, args: tuple, kwargs: dict) -> None:
        token_ids = args[0] if args else kwargs["input"]
        positions = self.pooled_position(token_ids.reshape(-1, token_ids.shape[-1])).detach()
        for layer in pool_layers_in(self.blocks):
            layer.routing_positions = positions


def pool_layers_in(module: nn.Module) -> Iterator[FusedRank1PoolLinear]:
    return (m for m in module.modules() if isinstance(m, FusedRank1PoolLinear))


def install_text_routing(model: nn.Module, towers: list[Tower], text_routing: str) -> None:
    """Route the pool layers of every text tower in `towers` on its end-of-text token ("eot") or on token 0
    ("first"). Idempotent: a tower gets at most one hook."""
    if text_routing not in TEXT_ROUTING:
        raise ValueError(f"text_routing={text_routing!r} is not supported; expected one of {TEXT_ROUTING}")
    for tower in towers:
        if tower.kind != "text":
            continue
        embedding = model.get_submodule(tower.token_embedding)
        remove_text_routing(embedding)
        blocks = model.get_submodule(tower.blocks)
        for layer in pool_layers_in(blocks):
            layer.routing_positions = None
        if text_routing == "eot" and any(True for _ in pool_layers_in(blocks)):
            embedding.register_forward_pre_hook(EndOfTextRouting(blocks, tower.pooled_position), with_kwargs=True)


def remove_text_routing(model: nn.Module) -> None:
    """Remove every EndOfTextRouting hook from `model`'s modules (unload() calls this)."""
    for module in model.modules():
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, EndOfTextRouting):
                del module._forward_pre_hooks[hook_id]
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)


def set_text_routing(model: nn.Module, text_routing: str = "eot") -> None:
    """Route the pool layers of every text tower found in `model` on the end-of-text token ("eot") or token 0
    ("first"). inject() does this itself; call it for pool layers put in another way (e.g. through peft)."""
    install_text_routing(model, find_towers(model), text_routing)
